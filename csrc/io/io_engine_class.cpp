// torch.classes.heteromem.IoEngine: the I/O engine (io_engine.h) as a TorchScript custom
// class, wrapped by heteromem/io/engine.py.
//
// Failures of the file operations come back as (errno, message) values rather than
// exceptions: a C++ exception reaches Python as RuntimeError, and the wrapper needs the errno
// to raise OSError(errno, message). Argument errors (misalignment, unknown handle or ticket)
// raise ValueError through TORCH_CHECK_VALUE.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <mutex>
#include <stdexcept>
#include <tuple>
#include <unordered_map>

#include "io_engine.h"

namespace heteromem {
namespace {

using Result = std::tuple<int64_t, std::string>;

Result result(const io::Status& status) { return {status.error, status.message}; }

// Runs fn, turning the core's argument errors into ValueError and the rest into RuntimeError.
template <typename Fn>
auto checked(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::logic_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

class IoEngineClass : public torch::CustomClassHolder {
 public:
  IoEngineClass(int64_t threads, int64_t block_bytes)
      : engine_(checked([&] { return std::make_unique<io::Engine>(threads, block_bytes); })) {}

  ~IoEngineClass() override {
    // The workers must be done with the buffers before buffers_ releases them.
    engine_.reset();
  }

  // (handle, errno, message): handle is -1 when errno is set.
  std::tuple<int64_t, int64_t, std::string> open(const std::string& path, bool create,
                                                 bool readonly) {
    io::Status status;
    const int64_t handle = engine_->open(path, create, &status, readonly);
    return {handle, status.error, status.message};
  }

  bool is_direct(int64_t handle) { return checked([&] { return engine_->is_direct(handle); }); }

  int64_t submit(int64_t handle, int64_t offset, const at::Tensor& buf, bool write) {
    TORCH_CHECK_VALUE(buf.device().is_cpu(),
                      "IoEngine.submit: buf must be a CPU tensor, got one on ", buf.device());
    TORCH_CHECK_VALUE(buf.is_contiguous(), "IoEngine.submit: buf must be contiguous");
    const int64_t ticket = checked([&] {
      return engine_->submit(handle, write ? io::Op::kWrite : io::Op::kRead, offset,
                             buf.data_ptr(), static_cast<int64_t>(buf.nbytes()));
    });
    // The engine works on raw bytes, so the tensor is kept alive here until its ticket is
    // waited: a caller that drops its reference early cannot free memory under a transfer.
    std::lock_guard<std::mutex> lock(mutex_);
    buffers_.emplace(ticket, buf);
    return ticket;
  }

  Result wait(int64_t ticket) {
    const io::Status status = checked([&] { return engine_->wait(ticket); });
    std::lock_guard<std::mutex> lock(mutex_);
    buffers_.erase(ticket);
    return result(status);
  }

  Result fsync(int64_t handle) { return result(checked([&] { return engine_->fsync(handle); })); }

  Result close(int64_t handle) { return result(checked([&] { return engine_->close(handle); })); }

  Result set_size(int64_t handle, int64_t nbytes) {
    return result(checked([&] { return engine_->set_size(handle, nbytes); }));
  }

  void inject_fault(const std::string& op, int64_t error, int64_t after) {
    checked([&] { engine_->inject_fault(op, static_cast<int>(error), after); });
  }

  void clear_faults() { engine_->clear_faults(); }

  void shutdown() { engine_->shutdown(); }

 private:
  std::mutex mutex_;
  std::unordered_map<int64_t, at::Tensor> buffers_;
  std::unique_ptr<io::Engine> engine_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(heteromem, m) {
  m.class_<IoEngineClass>("IoEngine")
      .def(torch::init<int64_t, int64_t>())
      .def("open", &IoEngineClass::open)
      .def("is_direct", &IoEngineClass::is_direct)
      .def("submit", &IoEngineClass::submit)
      .def("wait", &IoEngineClass::wait)
      .def("fsync", &IoEngineClass::fsync)
      .def("close", &IoEngineClass::close)
      .def("set_size", &IoEngineClass::set_size)
      .def("inject_fault", &IoEngineClass::inject_fault)
      .def("clear_faults", &IoEngineClass::clear_faults)
      .def("shutdown", &IoEngineClass::shutdown);
}

}  // namespace heteromem
