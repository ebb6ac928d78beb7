// Opening, sizing and pread/pwrite loops of one file (io_file.h).
#include "io_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <sstream>
#include <system_error>

namespace heteromem::io {

const char* op_name(Op op) { return op == Op::kRead ? "read" : "write"; }

std::string describe(Op op, int64_t nbytes, int64_t offset, const std::string& path) {
  std::ostringstream out;
  out << op_name(op) << " of " << nbytes << " bytes at offset " << offset << " in " << path;
  return out.str();
}

Status failure(int error, const std::string& what) {
  // std::system_category().message is strerror's text without strerror's shared buffer.
  return Status{error, what + " failed: " + std::system_category().message(error)};
}

namespace {

int open_fd(const std::string& path, int flags) {
  int fd;
  do {
    fd = ::open(path.c_str(), flags, 0644);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

}  // namespace

std::shared_ptr<File> File::open(const std::string& path, bool create, bool readonly,
                                 int direct_fault, Status* status) {
  const int flags = (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | (create ? O_CREAT : 0);
  const std::string what = std::string(create ? "open (create) of " : "open of ") + path;
#ifdef O_DIRECT
  if (readonly) direct_fault = EINVAL;  // buffered by choice: go straight to the fallback
  int fd = -1;
  int error = direct_fault;
  if (error == 0) {
    fd = open_fd(path, flags | O_DIRECT);
    error = fd < 0 ? errno : 0;
  }
  if (fd >= 0) {
    *status = Status{};
    return std::shared_ptr<File>(new File(fd, path, true));
  }
  // EINVAL means "this filesystem has no O_DIRECT"; anything else (ENOENT, EACCES) would fail
  // buffered too, so it is the answer.
  if (error != EINVAL) {
    *status = failure(error, what);
    return nullptr;
  }
#endif
  int buffered = open_fd(path, flags);
  if (buffered < 0) {
    *status = failure(errno, what);
    return nullptr;
  }
  *status = Status{};
  return std::shared_ptr<File>(new File(buffered, path, false));
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

Status File::transfer(Op op, int64_t offset, char* buf, int64_t nbytes) const {
  int64_t done = 0;
  while (done < nbytes) {
    const ssize_t n = op == Op::kRead
                          ? ::pread(fd_, buf + done, static_cast<size_t>(nbytes - done),
                                    static_cast<off_t>(offset + done))
                          : ::pwrite(fd_, buf + done, static_cast<size_t>(nbytes - done),
                                     static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return failure(errno, describe(op, nbytes, offset, path_));
    }
    if (n == 0) {
      std::ostringstream detail;
      detail << describe(op, nbytes, offset, path_) << " failed: short " << op_name(op)
             << ": got " << done << " of " << nbytes << " bytes"
             << (op == Op::kRead ? " (the file ends there)" : " (the device accepts no more)");
      return Status{EIO, detail.str()};
    }
    done += n;
  }
  return Status{};
}

Status File::set_size(int64_t nbytes) const {
  const std::string what = "set_size to " + std::to_string(nbytes) + " bytes of " + path_;
  struct stat st;
  if (::fstat(fd_, &st) != 0) return failure(errno, what);
  if (nbytes > st.st_size) {
#if defined(__linux__)
    int error;
    do {
      error = ::fallocate(fd_, 0, 0, static_cast<off_t>(nbytes)) == 0 ? 0 : errno;
    } while (error == EINTR);
#else
    const int error = EOPNOTSUPP;
#endif
    if (error == 0) return Status{};
    // Filesystems without fallocate get a sparse file; space errors then show up on write.
    if (error != EOPNOTSUPP && error != ENOSYS) return failure(error, what);
  }
  if (::ftruncate(fd_, static_cast<off_t>(nbytes)) != 0) return failure(errno, what);
  return Status{};
}

Status File::fsync() const {
  if (::fsync(fd_) != 0) return failure(errno, "fsync of " + path_);
  return Status{};
}

Status File::close() {
  const int fd = fd_;
  fd_ = -1;
  // NOTE: no retry on EINTR: Linux has released the descriptor either way.
  if (fd >= 0 && ::close(fd) != 0) return failure(errno, "close of " + path_);
  return Status{};
}

}  // namespace heteromem::io
