// Unit tests of the torch-free I/O engine: data written comes back intact across block
// splits and concurrent tickets, a read past the end is a short read (EIO), failpoints fail
// the chosen request without touching the file, and O_DIRECT misalignment is refused.
// Built and run by CMake/ctest (`make test-cpp`); files go to a fresh folder under $TMPDIR.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "../../csrc/io/io_engine.h"

using namespace heteromem::io;
using namespace heteromem::testing;

namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// A 4096-aligned buffer, as O_DIRECT needs.
struct Buffer {
  explicit Buffer(size_t n) : size(n) {
    void* p = nullptr;
    if (posix_memalign(&p, kDirectAlign, n == 0 ? kDirectAlign : n) != 0) std::abort();
    data.reset(static_cast<char*>(p));
  }
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data;
  size_t size;
};

void fill(Buffer& b, unsigned seed) {
  for (size_t i = 0; i < b.size; ++i) b.data.get()[i] = static_cast<char>((i * 131 + seed) >> 3);
}

std::string temp_dir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base ? base : "/tmp") + "/heteromem-io-test-XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) std::abort();
  return buf.data();
}

void test_round_trip(const std::string& dir) {
  // 12 KiB blocks: the 1 MiB + 4 KiB request splits into many blocks, the last one short.
  Engine engine(3, 3 * kDirectAlign);
  Status status;
  const int64_t h = engine.open(dir + "/round_trip.bin", true, &status);
  check(h >= 0 && status.ok(), "open(create): " + status.message);
  for (size_t size : {size_t(0), size_t(4096), size_t((1 << 20) + 4096)}) {
    Buffer out(size), in(size);
    fill(out, static_cast<unsigned>(size));
    std::memset(in.data.get(), 0, size);
    Status w = engine.wait(engine.submit(h, Op::kWrite, 8192, out.data.get(), size));
    check(w.ok(), "write " + std::to_string(size) + ": " + w.message);
    Status r = engine.wait(engine.submit(h, Op::kRead, 8192, in.data.get(), size));
    check(r.ok(), "read " + std::to_string(size) + ": " + r.message);
    check(std::memcmp(in.data.get(), out.data.get(), size) == 0,
          "data read back equals data written, " + std::to_string(size) + " bytes");
  }
  check(engine.fsync(h).ok(), "fsync");
  check(engine.close(h).ok(), "close");
}

void test_concurrent_tickets(const std::string& dir) {
  Engine engine(4, kDirectAlign);
  Status status;
  const int64_t h = engine.open(dir + "/concurrent.bin", true, &status);
  const size_t piece = 64 * 1024;
  std::vector<Buffer> outs, ins;
  std::vector<int64_t> tickets;
  for (unsigned i = 0; i < 16; ++i) {
    outs.emplace_back(piece);
    fill(outs.back(), i);
    tickets.push_back(engine.submit(h, Op::kWrite, i * piece, outs.back().data.get(), piece));
  }
  for (int64_t t : tickets) check(engine.wait(t).ok(), "concurrent write");
  tickets.clear();
  for (unsigned i = 0; i < 16; ++i) {
    ins.emplace_back(piece);
    tickets.push_back(engine.submit(h, Op::kRead, i * piece, ins.back().data.get(), piece));
  }
  bool same = true;
  for (unsigned i = 0; i < 16; ++i) {
    check(engine.wait(tickets[i]).ok(), "concurrent read");
    same = same && std::memcmp(ins[i].data.get(), outs[i].data.get(), piece) == 0;
  }
  check(same, "16 concurrent tickets read back what was written");
}

void test_short_read(const std::string& dir) {
  Engine engine(2, kDirectAlign);
  Status status;
  const std::string path = dir + "/short.bin";
  const int64_t h = engine.open(path, true, &status);
  Buffer b(2 * kDirectAlign);
  fill(b, 7);
  check(engine.wait(engine.submit(h, Op::kWrite, 0, b.data.get(), kDirectAlign)).ok(), "write");
  const Status r = engine.wait(engine.submit(h, Op::kRead, 0, b.data.get(), 2 * kDirectAlign));
  check(r.error == EIO, "a read past the end fails with EIO, got " + std::to_string(r.error));
  check(contains(r.message, "short read: got 0 of 4096 bytes") && contains(r.message, path) &&
            contains(r.message, "offset 4096"),
        "the short read message names the counts, path and offset: " + r.message);
}

void test_faults(const std::string& dir) {
  Engine engine(2, kDirectAlign);
  Status status;
  const std::string path = dir + "/faults.bin";
  const int64_t h = engine.open(path, true, &status);
  Buffer zero(kDirectAlign), ones(kDirectAlign), back(kDirectAlign);
  std::memset(zero.data.get(), 0, kDirectAlign);
  std::memset(ones.data.get(), 1, kDirectAlign);
  check(engine.wait(engine.submit(h, Op::kWrite, 0, zero.data.get(), kDirectAlign)).ok(), "write");
  engine.inject_fault("write", ENOSPC, 1);
  check(engine.wait(engine.submit(h, Op::kWrite, 0, zero.data.get(), kDirectAlign)).ok(),
        "the request before the failpoint succeeds");
  const Status w = engine.wait(engine.submit(h, Op::kWrite, 0, ones.data.get(), kDirectAlign));
  check(w.error == ENOSPC && contains(w.message, path) && contains(w.message, "offset 0"),
        "the (after+1)-th write fails with the injected errno: " + w.message);
  check(engine.wait(engine.submit(h, Op::kRead, 0, back.data.get(), kDirectAlign)).ok(), "read");
  check(std::memcmp(back.data.get(), zero.data.get(), kDirectAlign) == 0,
        "an injected write fault leaves the file untouched");
  check(engine.wait(engine.submit(h, Op::kWrite, 0, zero.data.get(), kDirectAlign)).ok(),
        "a fault fires once");
  engine.inject_fault("read", EIO, 0);
  engine.clear_faults();
  check(engine.wait(engine.submit(h, Op::kRead, 0, back.data.get(), kDirectAlign)).ok(),
        "clear_faults disarms");
  engine.inject_fault("open_direct", EINVAL, 0);
  const int64_t buffered = engine.open(path, false, &status);
  check(buffered >= 0 && !engine.is_direct(buffered), "EINVAL on O_DIRECT falls back to buffered");
}

void test_errors(const std::string& dir) {
  Engine engine(1, kDirectAlign);
  Status status;
  const std::string missing = dir + "/no/such/dir/file.bin";
  check(engine.open(missing, true, &status) == -1 && status.error == ENOENT &&
            contains(status.message, missing),
        "open in a missing folder fails with ENOENT naming the path: " + status.message);
  const int64_t h = engine.open(dir + "/align.bin", true, &status);
  if (!engine.is_direct(h)) {
    std::printf("note: %s has no O_DIRECT; alignment checks skipped\n", dir.c_str());
    return;
  }
  Buffer b(2 * kDirectAlign);
  const auto refused = [&](int64_t offset, char* buf, int64_t n, const std::string& what) {
    try {
      engine.submit(h, Op::kWrite, offset, buf, n);
    } catch (const std::invalid_argument& e) {
      return contains(e.what(), what);
    }
    return false;
  };
  check(refused(0, b.data.get() + 512, kDirectAlign, "buffer address"), "misaligned buffer");
  check(refused(512, b.data.get(), kDirectAlign, "offset"), "misaligned offset");
  check(refused(0, b.data.get(), 512, "length"), "misaligned length");
}

}  // namespace

int main() {
  const std::string dir = temp_dir();
  test_round_trip(dir);
  test_concurrent_tickets(dir);
  test_short_read(dir);
  test_faults(dir);
  test_errors(dir);
  std::filesystem::remove_all(dir);
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return exit_code();
}
