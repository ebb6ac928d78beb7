// The thread pool, tickets and failpoints of the I/O engine (io_engine.h).
#include "io_engine.h"

#include <sstream>
#include <stdexcept>

namespace heteromem::io {

Engine::Engine(int64_t threads, int64_t block_bytes) : block_bytes_(block_bytes) {
  if (threads < 1 || threads > 1024) {
    throw std::invalid_argument("IoEngine: threads must be between 1 and 1024, got " +
                                std::to_string(threads));
  }
  if (block_bytes <= 0 || block_bytes % kDirectAlign != 0) {
    throw std::invalid_argument("IoEngine: block_bytes must be a positive multiple of " +
                                std::to_string(kDirectAlign) + " (O_DIRECT), got " +
                                std::to_string(block_bytes));
  }
  workers_.reserve(static_cast<size_t>(threads));
  for (int64_t i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
}

Engine::~Engine() { shutdown(); }

void Engine::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (std::thread& worker : workers_) {
    if (worker.joinable()) worker.join();
  }
}

std::shared_ptr<File> Engine::file(int64_t handle) const {
  const auto it = files_.find(handle);
  if (it == files_.end()) {
    throw std::invalid_argument("IoEngine: unknown file handle " + std::to_string(handle) +
                                " (closed, or from another engine)");
  }
  return it->second;
}

int Engine::take_fault(FaultSite site) {
  Fault& fault = faults_[site];
  if (!fault.armed) return 0;
  if (fault.skip > 0) {
    --fault.skip;
    return 0;
  }
  fault.armed = false;
  return fault.error;
}

int64_t Engine::open(const std::string& path, bool create, Status* status, bool readonly) {
  int direct_fault = 0;
  if (!readonly) {  // a read-only file makes no O_DIRECT attempt to fail
    std::lock_guard<std::mutex> lock(mutex_);
    direct_fault = take_fault(kFaultOpenDirect);
  }
  // NOTE: opened outside the lock: open(2) can block (NFS, a busy drive) and must not stall
  // the workers.
  std::shared_ptr<File> f = File::open(path, create, readonly, direct_fault, status);
  if (!f) return -1;
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t handle = next_handle_++;
  files_.emplace(handle, std::move(f));
  return handle;
}

bool Engine::is_direct(int64_t handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return file(handle)->direct();
}

std::string Engine::path(int64_t handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return file(handle)->path();
}

namespace {

void check_aligned(int64_t value, const char* what, const File& f) {
  if (value % kDirectAlign == 0) return;
  std::ostringstream out;
  out << "IoEngine: " << what << " " << value << " is not a multiple of " << kDirectAlign
      << ", which O_DIRECT file " << f.path()
      << " needs; allocate buffers with heteromem.io.aligned_empty and keep offsets and "
         "lengths multiples of IoEngine.ALIGN";
  throw std::invalid_argument(out.str());
}

}  // namespace

int64_t Engine::submit(int64_t handle, Op op, int64_t offset, void* buf, int64_t nbytes) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (stopping_) throw std::logic_error("IoEngine: submit after shutdown()");
  std::shared_ptr<File> f = file(handle);
  if (offset < 0 || nbytes < 0) {
    throw std::invalid_argument("IoEngine: offset and length must be >= 0, got offset " +
                                std::to_string(offset) + " and length " + std::to_string(nbytes));
  }
  if (f->direct()) {
    check_aligned(static_cast<int64_t>(reinterpret_cast<uintptr_t>(buf)), "buffer address", *f);
    check_aligned(offset, "offset", *f);
    check_aligned(nbytes, "length", *f);
  }
  const int64_t id = next_ticket_++;
  Ticket& ticket = tickets_[id];
  const int fault = take_fault(op == Op::kRead ? kFaultRead : kFaultWrite);
  if (fault != 0) {
    ticket.status = failure(fault, describe(op, nbytes, offset, f->path()));
    ticket.status.message += " (injected fault)";
    return id;
  }
  char* bytes = static_cast<char*>(buf);
  for (int64_t start = 0; start < nbytes; start += block_bytes_) {
    queue_.push_back(Block{f, &ticket, op, offset + start, bytes + start,
                           std::min(block_bytes_, nbytes - start)});
    ++ticket.remaining;
  }
  const int64_t blocks = ticket.remaining;  // read under the lock: workers change it
  lock.unlock();
  if (blocks == 1) {
    work_ready_.notify_one();
  } else if (blocks > 1) {
    work_ready_.notify_all();
  }
  return id;
}

Status Engine::wait(int64_t id) {
  std::unique_lock<std::mutex> lock(mutex_);
  const auto it = tickets_.find(id);
  if (it == tickets_.end()) {
    throw std::invalid_argument("IoEngine: unknown ticket " + std::to_string(id) +
                                " (already waited, or from another engine)");
  }
  ticket_done_.wait(lock, [&] { return it->second.remaining == 0; });
  Status status = std::move(it->second.status);
  tickets_.erase(it);
  return status;
}

void Engine::work() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    // Workers drain the queue before they stop, so no buffer is left half transferred.
    work_ready_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;
    Block block = std::move(queue_.front());
    queue_.pop_front();
    // After its first error a ticket's other blocks are skipped: its result is that error.
    if (block.ticket->status.ok()) {
      lock.unlock();
      Status status = block.file->transfer(block.op, block.offset, block.buf, block.nbytes);
      block.file.reset();  // a closed handle's descriptor is released with its last block
      lock.lock();
      if (!status.ok() && block.ticket->status.ok()) block.ticket->status = std::move(status);
    }
    if (--block.ticket->remaining == 0) ticket_done_.notify_all();
  }
}

Status Engine::fsync(int64_t handle) {
  std::shared_ptr<File> f;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    f = file(handle);
  }
  return f->fsync();
}

Status Engine::set_size(int64_t handle, int64_t nbytes) {
  if (nbytes < 0) {
    throw std::invalid_argument("IoEngine: set_size needs nbytes >= 0, got " +
                                std::to_string(nbytes));
  }
  std::shared_ptr<File> f;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    f = file(handle);
  }
  return f->set_size(nbytes);
}

Status Engine::close(int64_t handle) {
  std::shared_ptr<File> f;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    f = file(handle);
    files_.erase(handle);
    // Blocks in flight hold the file too; then its descriptor closes after the last of them.
    if (f.use_count() > 1) return Status{};
  }
  return f->close();
}

void Engine::inject_fault(const std::string& op, int error, int64_t after) {
  FaultSite site;
  if (op == "read") {
    site = kFaultRead;
  } else if (op == "write") {
    site = kFaultWrite;
  } else if (op == "open_direct") {
    site = kFaultOpenDirect;
  } else {
    throw std::invalid_argument("IoEngine.inject_fault: op must be \"read\", \"write\" or "
                                "\"open_direct\", got \"" + op + "\"");
  }
  if (error <= 0) {
    throw std::invalid_argument("IoEngine.inject_fault: errno must be a positive errno value, "
                                "got " + std::to_string(error));
  }
  if (after < 0) {
    throw std::invalid_argument("IoEngine.inject_fault: after must be >= 0, got " +
                                std::to_string(after));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  faults_[site] = Fault{true, error, after};
}

void Engine::clear_faults() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Fault& fault : faults_) fault = Fault{};
}

}  // namespace heteromem::io
