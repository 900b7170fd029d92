// What the emulated-launch programs share: arguments from the command line, input bytes from
// stdin, device buffers at chosen offsets from a 64-byte boundary (allocated to their exact size,
// so AddressSanitizer sees a read past the end, and filled with 0xff before a kernel writes
// them), output bytes to stdout. tests/test_emulation.py writes the inputs and reads the outputs.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace emulation_driver {

[[noreturn]] inline void usage(const char* what) {
  std::fprintf(stderr, "emulation driver: %s\n", what);
  std::exit(2);
}

class Args {
 public:
  Args(int argc, char** argv) : argv_(argv + 1, argv + argc) {}
  std::string text() {
    if (next_ >= argv_.size()) usage("too few arguments");
    return argv_[next_++];
  }
  int64_t integer() { return std::stoll(text()); }
  double real() { return std::stod(text()); }
  void done() const {
    if (next_ != argv_.size()) usage("too many arguments");
  }

 private:
  std::vector<std::string> argv_;
  size_t next_ = 0;
};

// stdin, read once, handed out in order.
class Input {
 public:
  Input() {
    char chunk[1 << 16];
    size_t n;
    while ((n = std::fread(chunk, 1, sizeof(chunk), stdin)) > 0) bytes_.insert(bytes_.end(), chunk, chunk + n);
  }
  void take(void* dst, size_t n) {
    if (pos_ + n > bytes_.size()) usage("stdin is shorter than the arguments say");
    std::memcpy(dst, bytes_.data() + pos_, n);
    pos_ += n;
  }
  void done() const {
    if (pos_ != bytes_.size()) usage("stdin is longer than the arguments say");
  }

 private:
  std::vector<unsigned char> bytes_;
  size_t pos_ = 0;
};

// `bytes` bytes starting `offset` bytes past a 64-byte boundary; the bytes before `offset` belong
// to the allocation but to no tensor.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, size_t offset) : bytes_(bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, offset + bytes + (bytes == 0 ? 1 : 0)) != 0) usage("out of memory");
    base_ = static_cast<unsigned char*>(p);
    std::memset(base_, 0xff, offset + bytes);
    data_ = base_ + offset;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : base_(o.base_), data_(o.data_), bytes_(o.bytes_) { o.base_ = nullptr; }
  ~Buffer() { std::free(base_); }

  template <typename T = unsigned char>
  T* data() const {
    return reinterpret_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  void read(Input& in) { in.take(data_, bytes_); }
  void write() const {
    if (std::fwrite(data_, 1, bytes_, stdout) != bytes_) usage("short write");
  }

 private:
  unsigned char* base_ = nullptr;
  unsigned char* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace emulation_driver
