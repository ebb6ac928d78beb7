// One file of the NVMe tier: opened with O_DIRECT where the filesystem allows it, and the
// pread/pwrite loops that move one block of a request. Torch-free.
//
// Errors are values (Status), not exceptions, because they are found on worker threads and
// reported to whoever waits on the request. Every message names the operation, the byte count,
// the offset and the path, so the Python OSError built from it says what failed where.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace heteromem::io {

// O_DIRECT needs buffer address, file offset and length to be multiples of this (the logical
// block size of every NVMe drive and of ext4/xfs pages).
constexpr int64_t kDirectAlign = 4096;

struct Status {
  int error = 0;        // errno; 0 is success
  std::string message;  // empty on success
  bool ok() const { return error == 0; }
};

enum class Op { kRead, kWrite };

const char* op_name(Op op);

// "read of 4096 bytes at offset 8192 in /path"
std::string describe(Op op, int64_t nbytes, int64_t offset, const std::string& path);

// `<what> failed: <strerror(error)>`; the text Python's os.strerror gives, so both backends agree.
Status failure(int error, const std::string& what);

class File {
 public:
  // Opens `path` read-write (creating it when `create`), with O_DIRECT unless the filesystem
  // refuses it with EINVAL (tmpfs before Linux 6.6, some FUSE mounts), then buffered.
  // `readonly`: read-only and buffered (files heteromem reads but does not own, such as
  // checkpoints, whose offsets are not aligned for O_DIRECT); `create` must be false.
  // `direct_fault`: when non-zero the O_DIRECT attempt fails with this errno without being
  // made (a test hook for the fallback on filesystems that do support O_DIRECT).
  // Returns nullptr and sets *status on failure.
  static std::shared_ptr<File> open(const std::string& path, bool create, bool readonly,
                                    int direct_fault, Status* status);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  bool direct() const { return direct_; }

  // Moves all `nbytes` at `offset`, looping over partial transfers. A read that reaches the
  // end of the file first, or a write that makes no progress, fails with EIO.
  Status transfer(Op op, int64_t offset, char* buf, int64_t nbytes) const;
  // Gives the file exactly `nbytes`, with its blocks allocated where the filesystem can
  // (fallocate), so running out of space shows up here (ENOSPC) rather than mid-write.
  Status set_size(int64_t nbytes) const;
  Status fsync() const;
  // Closes now and reports close(2)'s error; the destructor closes silently otherwise.
  Status close();

 private:
  File(int fd, std::string path, bool direct) : fd_(fd), path_(std::move(path)), direct_(direct) {}

  int fd_;
  std::string path_;
  bool direct_;
};

}  // namespace heteromem::io
