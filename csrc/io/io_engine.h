// The asynchronous file I/O engine of the NVMe tier: a thread pool that reads and writes
// host buffers at (file, offset) with pread/pwrite. Torch-free; io_engine_class.cpp exposes it
// to Python as torch.classes.heteromem.IoEngine.
//
// A request is split into blocks of `block_bytes` queued FIFO to the workers, so one large
// request keeps several blocks in flight (an NVMe drive needs queue depth to reach its
// bandwidth). A ticket completes when all its blocks have; its status is the first error any
// block hit (the blocks after it are skipped).
//
// Failpoints, for tests: inject_fault(op, errno, after) makes the (after+1)-th *request* of
// that op submitted from now on fail with errno, without touching the file (counting whole
// requests, not blocks, so tests need not know the block size). Op "open_direct" instead makes
// the O_DIRECT attempt of the (after+1)-th open fail, e.g. with EINVAL to exercise the
// buffered fallback on a filesystem that supports O_DIRECT. Each fault fires once.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "io_file.h"

namespace heteromem::io {

class Engine {
 public:
  // Throws std::invalid_argument unless threads >= 1 and block_bytes is a positive multiple
  // of kDirectAlign.
  Engine(int64_t threads, int64_t block_bytes);
  // Finishes every queued block (buffers may still be in use until then), then joins.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // A handle (>= 0), or -1 with *status set. `readonly`: opened read-only and buffered (see
  // File::open).
  int64_t open(const std::string& path, bool create, Status* status, bool readonly = false);
  // Throw std::invalid_argument for an unknown handle.
  bool is_direct(int64_t handle) const;
  std::string path(int64_t handle) const;

  // Queues the transfer of `nbytes` at `buf` to/from `offset`; returns the ticket to wait on.
  // `buf` must stay valid until then. Throws std::invalid_argument for an unknown handle, a
  // negative offset or size, or (O_DIRECT files) a misaligned address, offset or length;
  // std::logic_error after shutdown().
  int64_t submit(int64_t handle, Op op, int64_t offset, void* buf, int64_t nbytes);
  // Blocks until the ticket's blocks are done and forgets it. Throws std::invalid_argument for
  // an unknown (or already waited) ticket.
  Status wait(int64_t ticket);

  Status fsync(int64_t handle);
  // Forgets the handle. Blocks still in flight keep the file open until they finish.
  Status close(int64_t handle);
  Status set_size(int64_t handle, int64_t nbytes);

  // op: "read", "write" or "open_direct"; throws std::invalid_argument otherwise.
  void inject_fault(const std::string& op, int error, int64_t after);
  void clear_faults();

  // Finishes what is queued and stops the workers; later submits throw.
  void shutdown();

 private:
  struct Ticket {
    int64_t remaining = 0;
    Status status;
  };
  struct Block {
    std::shared_ptr<File> file;
    Ticket* ticket;  // stable: unordered_map nodes do not move, and a ticket outlives its blocks
    Op op;
    int64_t offset;
    char* buf;
    int64_t nbytes;
  };
  struct Fault {
    bool armed = false;
    int error = 0;
    int64_t skip = 0;
  };
  enum FaultSite { kFaultRead = 0, kFaultWrite = 1, kFaultOpenDirect = 2, kFaultSites = 3 };

  std::shared_ptr<File> file(int64_t handle) const;  // caller holds mutex_
  int take_fault(FaultSite site);                     // caller holds mutex_
  void work();

  const int64_t block_bytes_;
  mutable std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable ticket_done_;
  std::deque<Block> queue_;
  std::unordered_map<int64_t, std::shared_ptr<File>> files_;
  std::unordered_map<int64_t, Ticket> tickets_;
  Fault faults_[kFaultSites];
  int64_t next_handle_ = 0;
  int64_t next_ticket_ = 1;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace heteromem::io
