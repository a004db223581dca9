// autofit.simdev: a simulated accelerator whose memory is capped, for testing out-of-memory
// behaviour on machines without a GPU. Registered as torch's PrivateUse1 backend (renamed "sim"
// by simdev/__init__.py).
//
// - Device memory is host memory, but every byte placed on the device goes through
//   DeviceMemory, which enforces a cap and raises torch.OutOfMemoryError with the CUDA caching
//   allocator's wording at the allocation that does not fit. It keeps c10 DeviceStats, so
//   torch.accelerator.memory_allocated / max_memory_allocated / reset_peak_memory_stats /
//   get_memory_info work. No caching: reserved == allocated, no fragmentation.
// - Pinned host memory goes through PinnedMemory, with its own cap; a pinned allocation that
//   does not fit raises what CUDA's pinned allocator raises when cudaHostAlloc fails
//   (torch.AcceleratorError, "CUDA error: out of memory").
// - Copies between host and device are counted (bytes host->device pinned / pageable,
//   device->host, device->device).
// - Compute runs on the CPU: the backend fallback hands the CPU kernel host tensors that alias
//   the device tensors' memory (no copy); a result that is new memory is copied into a device
//   allocation, which counts against the cap like a real output would.
// - Streams and events exist (ids and timestamps) but everything is synchronous.
// - One device, index 0.
//
// Python reaches this file through the ops in the autofit_simdev namespace (bottom); there is
// no pybind11 module, which keeps the build short.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/core/Tensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/unfold_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace simdev {

constexpr c10::DeviceType kSim = c10::DeviceType::PrivateUse1;
constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();
const c10::Device kDevice(kSim, 0);

// ------------------------------------------------------------------------------------ counters
enum Counter : int { H2D_PINNED, H2D_PAGEABLE, D2H, D2D, DEVICE_OOMS, PINNED_OOMS, kNumCounters };
const char* const kCounterNames[kNumCounters] = {
    "h2d_pinned_bytes", "h2d_pageable_bytes", "d2h_bytes", "d2d_bytes", "device_ooms", "pinned_ooms"};
std::atomic<int64_t> g_counters[kNumCounters];

// Copies made by the copying fallback to run a kernel on the CPU are compute, not transfers.
thread_local bool tl_in_fallback = false;

// The CUDA caching allocator's size format (c10/cuda/CUDACachingAllocator.cpp, format_size).
std::string format_size(uint64_t size) {
  std::ostringstream os;
  os.precision(2);
  os << std::fixed;
  if (size <= 1024) {
    os << size << " bytes";
  } else if (size <= 1048576) {
    os << static_cast<double>(size) / 1024.0 << " KiB";
  } else if (size <= 1073741824ULL) {
    os << static_cast<double>(size) / 1048576.0 << " MiB";
  } else {
    os << static_cast<double>(size) / 1073741824.0 << " GiB";
  }
  return os.str();
}

void check_index(c10::DeviceIndex index) {
  TORCH_CHECK(index <= 0, "sim has one device, sim:0; got sim:", static_cast<int>(index));
}

// ------------------------------------------------------------------------------- device memory
using c10::CachingDeviceAllocator::DeviceStats;
using c10::CachingAllocator::StatType;

class DeviceMemory final : public c10::DeviceAllocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &DeviceMemory::free_fn, kDevice};
    const auto n = static_cast<int64_t>(nbytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      const int64_t used = stats_.allocated_bytes[agg()].current;
      if (n > cap_ - used) {
        stats_.num_ooms++;
        g_counters[DEVICE_OOMS]++;
        // The CUDA caching allocator's message, so OOM classifiers and message parsers read it
        // as they would a real GPU's. Nothing else uses the device: this process's memory is
        // what PyTorch allocated, and nothing is reserved but unallocated.
        std::ostringstream msg;
        msg << "CUDA out of memory. Tried to allocate " << format_size(nbytes) << ". GPU 0 has a total capacity of "
            << format_size(cap_) << " of which " << format_size(std::max<int64_t>(0, cap_ - used))
            << " is free. Including non-PyTorch memory, this process has " << format_size(used)
            << " memory in use. Of the allocated memory " << format_size(used)
            << " is allocated by PyTorch, and " << format_size(0)
            << " is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
               "Memory Management  (https://docs.pytorch.org/docs/stable/notes/cuda.html"
               "#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)";
        TORCH_CHECK_WITH(OutOfMemoryError, false, msg.str());
      }
      account(n, +1);  // claimed before the host allocation, released again if that fails
    }
    void* p = nullptr;
    try {
      p = c10::alloc_cpu(nbytes);  // the host itself out of memory: DefaultCPUAllocator's error
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      account(n, -1);
      throw;
    }
    std::lock_guard<std::mutex> lock(mu_);
    sizes_.emplace(p, nbytes);
    return {p, p, &DeviceMemory::free_fn, kDevice};
  }

  static void free_fn(void* p);

  void release(void* p) {
    if (p == nullptr) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sizes_.find(p);
      if (it == sizes_.end()) {  // not ours: leave it rather than free what another allocator owns
        TORCH_WARN_ONCE("sim: asked to free device memory it did not allocate; left alone");
        return;
      }
      account(static_cast<int64_t>(it->second), -1);
      sizes_.erase(it);
    }
    c10::free_cpu(p);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &DeviceMemory::free_fn; }
  void copy_data(void* dst, const void* src, std::size_t n) const override { std::memcpy(dst, src, n); }
  bool initialized() override { return true; }
  void emptyCache(c10::MempoolId_t) override {}  // nothing is cached
  void recordStream(const c10::DataPtr&, c10::Stream) override {}  // synchronous streams

  DeviceStats getDeviceStats(c10::DeviceIndex index) override {
    check_index(index);
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void resetAccumulatedStats(c10::DeviceIndex index) override {
    check_index(index);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto* arr : {&stats_.allocation, &stats_.segment, &stats_.active, &stats_.allocated_bytes,
                      &stats_.reserved_bytes, &stats_.active_bytes, &stats_.requested_bytes}) {
      for (auto& s : *arr) s.reset_accumulated();
    }
    stats_.num_ooms = 0;
    stats_.num_device_alloc = 0;
    stats_.num_device_free = 0;
  }
  void resetPeakStats(c10::DeviceIndex index) override {
    check_index(index);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto* arr : {&stats_.allocation, &stats_.segment, &stats_.active, &stats_.allocated_bytes,
                      &stats_.reserved_bytes, &stats_.active_bytes, &stats_.requested_bytes}) {
      for (auto& s : *arr) s.reset_peak();
    }
  }
  std::pair<size_t, size_t> getMemoryInfo(c10::DeviceIndex index) override {  // (free, total)
    check_index(index);
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t used = stats_.allocated_bytes[agg()].current;
    return {static_cast<size_t>(std::max<int64_t>(0, cap_ - used)), static_cast<size_t>(cap_)};
  }

  void set_cap(int64_t cap) {
    TORCH_CHECK(cap >= 0, "sim: the cap must be >= 0 bytes, got ", cap);
    std::lock_guard<std::mutex> lock(mu_);
    cap_ = cap;
  }
  int64_t cap() {
    std::lock_guard<std::mutex> lock(mu_);
    return cap_;
  }
  std::vector<int64_t> summary() {  // allocated, peak, cap
    std::lock_guard<std::mutex> lock(mu_);
    const auto& s = stats_.allocated_bytes[agg()];
    return {s.current, s.peak, cap_};
  }

 private:
  static size_t agg() { return static_cast<size_t>(StatType::AGGREGATE); }

  // Every block is its own segment: allocated == reserved == active == requested.
  void account(int64_t nbytes, int sign) {
    const size_t pool = static_cast<size_t>(nbytes >= (1 << 20) ? StatType::LARGE_POOL : StatType::SMALL_POOL);
    for (size_t i : {agg(), pool}) {
      for (auto* s : {&stats_.allocated_bytes[i], &stats_.reserved_bytes[i], &stats_.active_bytes[i],
                      &stats_.requested_bytes[i]}) {
        sign > 0 ? s->increase(nbytes) : s->decrease(nbytes);
      }
      for (auto* s : {&stats_.allocation[i], &stats_.segment[i], &stats_.active[i]}) {
        sign > 0 ? s->increase(1) : s->decrease(1);
      }
    }
    sign > 0 ? stats_.num_device_alloc++ : stats_.num_device_free++;
  }

  std::mutex mu_;
  int64_t cap_ = kUnlimited;
  DeviceStats stats_;
  std::unordered_map<void*, size_t> sizes_;
};

DeviceMemory g_device_memory;
void DeviceMemory::free_fn(void* p) { g_device_memory.release(p); }

// ------------------------------------------------------------------------- pinned host memory
class PinnedMemory final : public at::HostAllocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &PinnedMemory::free_fn, c10::Device(c10::kCPU)};
    const auto n = static_cast<int64_t>(nbytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (n > cap_ - current_) {
        g_counters[PINNED_OOMS]++;
        // What CUDA's pinned allocator raises when cudaHostAlloc fails: C10_CUDA_CHECK's
        // AcceleratorError for cudaErrorMemoryAllocation (2).
        throw c10::AcceleratorError(
            {__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, 2,
            "CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation' in "
            "https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html for more information.\n"
            "For more detailed error information, run with CUDA_LOG_FILE=stderr\n"
            "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n");
      }
      current_ += n;  // claimed before the host allocation, released again if that fails
    }
    void* p = nullptr;
    try {
      p = c10::alloc_cpu(nbytes);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      current_ -= n;
      throw;
    }
    std::lock_guard<std::mutex> lock(mu_);
    blocks_.emplace(reinterpret_cast<uintptr_t>(p), nbytes);
    peak_ = std::max(peak_, current_);
    allocations_++;
    return {p, p, &PinnedMemory::free_fn, c10::Device(c10::kCPU)};
  }

  static void free_fn(void* p);

  void release(void* p) {
    if (p == nullptr) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = blocks_.find(reinterpret_cast<uintptr_t>(p));
      if (it == blocks_.end()) {
        TORCH_WARN_ONCE("sim: asked to free pinned memory it did not allocate; left alone");
        return;
      }
      current_ -= static_cast<int64_t>(it->second);
      blocks_.erase(it);
      frees_++;
    }
    c10::free_cpu(p);
  }

  // Whether p points into a pinned block (a view's data pointer can be inside one).
  bool contains(const void* p) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = blocks_.upper_bound(a);
    if (it == blocks_.begin()) return false;
    --it;
    return a < it->first + it->second;
  }

  c10::DeleterFnPtr raw_deleter() const override { return &PinnedMemory::free_fn; }
  void copy_data(void* dst, const void* src, std::size_t n) const override { std::memcpy(dst, src, n); }
  bool record_event(void*, void*, c10::Stream) override { return true; }  // synchronous streams
  void empty_cache() override {}  // nothing is cached
  at::HostStats get_stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    at::HostStats s;
    for (auto* stat : {&s.allocated_bytes, &s.active_bytes}) {
      stat->current = current_;
      stat->peak = peak_;
    }
    s.allocations.current = s.active_requests.current = static_cast<int64_t>(blocks_.size());
    s.num_host_alloc = allocations_;
    s.num_host_free = frees_;
    return s;
  }
  void reset_accumulated_stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    allocations_ = frees_ = 0;
  }
  void reset_peak_stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = current_;
  }

  void set_cap(int64_t cap) {
    TORCH_CHECK(cap >= 0, "sim: the pinned cap must be >= 0 bytes, got ", cap);
    std::lock_guard<std::mutex> lock(mu_);
    cap_ = cap;
  }
  std::vector<int64_t> summary() {  // current, peak, cap
    std::lock_guard<std::mutex> lock(mu_);
    return {current_, peak_, cap_};
  }

 private:
  std::mutex mu_;
  int64_t cap_ = kUnlimited, current_ = 0, peak_ = 0, allocations_ = 0, frees_ = 0;
  std::map<uintptr_t, size_t> blocks_;
};

PinnedMemory g_pinned_memory;
void PinnedMemory::free_fn(void* p) { g_pinned_memory.release(p); }

// ------------------------------------------------------------------- device, streams, events
// Every op runs to completion when called, so a stream is only an id and an event is complete
// as soon as it is recorded (it keeps the time, for elapsed_time).
thread_local c10::StreamId tl_stream = 0;
std::atomic<c10::StreamId> g_next_stream{1};

struct SimEvent {
  std::chrono::steady_clock::time_point at;
};

struct GuardImpl final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kSim; }
  c10::Device exchangeDevice(c10::Device d) const override {
    check_index(d.index());
    return kDevice;
  }
  c10::Device getDevice() const override { return kDevice; }
  void setDevice(c10::Device d) const override { check_index(d.index()); }
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device) const override { return c10::Stream(c10::Stream::UNSAFE, kDevice, tl_stream); }
  c10::Stream getDefaultStream(c10::Device) const override { return c10::Stream(c10::Stream::UNSAFE, kDevice, 0); }
  c10::Stream getNewStream(c10::Device, int) const override {
    return c10::Stream(c10::Stream::UNSAFE, kDevice, g_next_stream++);
  }
  c10::Stream getStreamFromGlobalPool(c10::Device d, bool) const override { return getNewStream(d, 0); }
  c10::Stream exchangeStream(c10::Stream s) const override {
    const auto old = tl_stream;
    tl_stream = s.id();
    return c10::Stream(c10::Stream::UNSAFE, kDevice, old);
  }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void** event, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {
    if (*event == nullptr) *event = new SimEvent();
    static_cast<SimEvent*>(*event)->at = std::chrono::steady_clock::now();
  }
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void* event, const c10::DeviceIndex) const noexcept override {
    delete static_cast<SimEvent*>(event);
  }
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
  void recordDataPtrOnStream(const c10::DataPtr&, const c10::Stream&) const override {}
  double elapsedTime(void* start, void* end, const c10::DeviceIndex) const override {
    TORCH_CHECK(start && end, "sim: both events must be recorded before elapsed_time");
    return std::chrono::duration<double, std::milli>(static_cast<SimEvent*>(end)->at -
                                                     static_cast<SimEvent*>(start)->at)
        .count();
  }
};
C10_REGISTER_GUARD_IMPL(PrivateUse1, GuardImpl);

void grow_storage(const c10::Storage& storage, size_t nbytes);

struct Hooks final : public at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  void setCurrentDevice(c10::DeviceIndex d) const override { check_index(d); }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex d) const override {
    check_index(d);
    return 0;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex d) const override { return exchangeDevice(d); }
  bool isPinnedPtr(const void* p) const override { return g_pinned_memory.contains(p); }
  c10::Allocator* getPinnedMemoryAllocator() const override { return &g_pinned_memory; }
  at::Device getDeviceFromPtr(void*) const override { return kDevice; }
  // Random numbers for the device come from the CPU generator: its kernels are the CPU's.
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    return at::detail::getDefaultCPUGenerator();
  }
  at::Generator getNewGenerator(c10::DeviceIndex) const override { return at::detail::createCPUGenerator(); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t nbytes) const override {
    grow_storage(storage, nbytes);
  }
};
Hooks g_hooks;

// ------------------------------------------------------------------------- tensors and copies
// A CPU tensor over the same memory as a device tensor (both live in host memory).
at::Tensor host_view(const at::Tensor& t) {
  if (!t.defined() || t.device().type() != kSim) return t;
  // Not resizable, even when empty: a kernel that must grow an out= tensor fails, and the
  // copying fallback (which can grow the device tensor) runs instead.
  return at::from_blob(t.data_ptr(), t.sizes(), t.strides(), at::TensorOptions().dtype(t.scalar_type()).device(c10::kCPU));
}

// A device tensor of the given geometry over a device tensor's storage.
at::Tensor device_tensor_on(const c10::Storage& storage, const at::Tensor& like, int64_t offset) {
  auto t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(storage), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                                    like.dtype());
  t.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(), offset);
  return t;
}

void grow_storage(const c10::Storage& storage, size_t nbytes) {
  auto* impl = storage.unsafeGetStorageImpl();
  TORCH_CHECK(impl->resizable(), "Trying to resize storage that is not resizable");
  c10::DataPtr fresh = g_device_memory.allocate(nbytes);
  const size_t keep = std::min(nbytes, impl->nbytes());
  if (keep > 0 && impl->data() != nullptr) std::memcpy(fresh.get(), impl->data(), keep);
  impl->set_data_ptr_noswap(std::move(fresh));
  impl->set_nbytes(nbytes);
}

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<at::ScalarType> dtype, std::optional<at::Layout>,
                               std::optional<at::Device> device, std::optional<bool>,
                               std::optional<at::MemoryFormat> memory_format) {
  if (device) check_index(device->index());
  return at::detail::empty_generic(size, &g_device_memory, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                         std::optional<at::Layout>, std::optional<at::Device> device, std::optional<bool>) {
  if (device) check_index(device->index());
  return at::detail::empty_strided_generic(size, stride, &g_device_memory,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          std::optional<at::MemoryFormat> memory_format) {
  auto* impl = self.unsafeGetTensorImpl();
  const size_t need =
      at::detail::computeStorageNbytesContiguous(size, self.dtype().itemsize(), impl->storage_offset());
  if (need > self.storage().nbytes()) grow_storage(self.storage(), need);  // may raise: sizes unchanged
  impl->set_sizes_contiguous(size);
  if (memory_format && *memory_format != at::MemoryFormat::Preserve) impl->empty_tensor_restride(*memory_format);
  return self;
}

at::Tensor copy_from(const at::Tensor& src, const at::Tensor& dst, bool /*non_blocking: synchronous*/) {
  if (!tl_in_fallback) {
    // What a real device moves: CUDA converts dtypes on the source side, so dst's bytes cross.
    const int64_t n = static_cast<int64_t>(dst.numel()) * static_cast<int64_t>(dst.element_size());
    const bool from_host = src.device().type() != kSim, to_host = dst.device().type() != kSim;
    if (from_host && !to_host) {
      const bool pinned = src.data_ptr() != nullptr && at::globalContext().isPinnedPtr(src.data_ptr());
      g_counters[pinned ? H2D_PINNED : H2D_PAGEABLE] += n;
    } else if (!from_host && to_host) {
      g_counters[D2H] += n;
    } else if (!from_host && !to_host) {
      g_counters[D2D] += n;
    }
  }
  host_view(dst).copy_(host_view(src));
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& src, const at::Tensor& dst) {
  resize_(dst, src.sizes(), std::nullopt);
  return copy_from(src, dst, false);
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage source, int64_t offset, c10::IntArrayRef size,
                        c10::IntArrayRef stride) {
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(std::move(source));
  if (stride.empty()) {  // no strides given: contiguous
    impl->set_storage_offset(offset);
    impl->set_sizes_contiguous(size);
  } else {
    impl->set_sizes_and_strides(size, stride, offset);
  }
  return self;
}

at::Tensor& set_storage_only(at::Tensor& self, c10::Storage source) {
  const auto n = static_cast<int64_t>(source.nbytes() / self.dtype().itemsize());
  return set_storage(self, std::move(source), 0, {n}, {});
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  return set_storage(self, source.storage(), source.storage_offset(), source.sizes(), source.strides());
}

// `param.data = tensor_on_the_other_device` (accelerate, diffusers' offloading) swaps a tensor's
// implementation in place; torch allows it only between compatible key sets. CPU and sim
// tensors are both plain strided tensors in host memory.
bool compatible_shallow_copy(const at::Tensor& self, const at::Tensor& from) {
  auto plain = [](const at::Tensor& t) {
    return t.layout() == at::kStrided && (t.device().type() == kSim || t.device().type() == c10::kCPU);
  };
  return self.unsafeGetTensorImpl()->has_compatible_shallow_copy_type(from.key_set()) || (plain(self) && plain(from));
}

void record_stream(at::Tensor&, c10::Stream) {}  // synchronous streams: nothing to wait for

// ----------------------------------------------------------------------------- CPU fallback
// Device tensors in the arguments are replaced by host views of the same memory and the CPU
// kernel runs on them, so in-place and out= kernels write device memory directly. Returned
// tensors are mapped back: the very host view (in-place, out=) becomes its device tensor; a
// view of a device tensor's memory becomes a device view; new memory is copied into a device
// allocation, which counts against the cap. Ops whose out= tensors must be resized (a host view
// cannot grow) take torch's copying fallback instead.
struct Alias {
  at::Tensor device, host;
};

at::Tensor map_result(const at::Tensor& r, const std::vector<Alias>& aliases,
                      const std::vector<at::Tensor>& host_inputs) {
  if (!r.defined() || r.device().type() != c10::kCPU) return r;
  for (const auto& a : aliases) {
    if (r.unsafeGetTensorImpl() == a.host.unsafeGetTensorImpl()) return a.device;
  }
  for (const auto& h : host_inputs) {
    if (r.unsafeGetTensorImpl() == h.unsafeGetTensorImpl() || (h.has_storage() && r.has_storage() && r.storage().is_alias_of(h.storage())))
      return r;  // a genuine host tensor handed back
  }
  if (r.has_storage() && r.storage().data() != nullptr) {
    const char* rb = static_cast<const char*>(r.storage().data());
    for (const auto& a : aliases) {
      if (!a.host.has_storage() || a.host.storage().data() != rb) continue;
      // The host view's storage starts at the device tensor's data pointer.
      const int64_t byte_offset = (static_cast<const char*>(a.device.data_ptr()) -
                                   static_cast<const char*>(a.device.storage().data())) +
                                  r.storage_offset() * static_cast<int64_t>(r.element_size());
      if (byte_offset % static_cast<int64_t>(r.element_size()) != 0) break;  // misaligned: copy it
      return device_tensor_on(a.device.storage(), r, byte_offset / static_cast<int64_t>(r.element_size()));
    }
  }
  auto out = at::detail::empty_strided_generic(r.sizes(), r.strides(), &g_device_memory,
                                               c10::DispatchKeySet(c10::DispatchKey::PrivateUse1), r.scalar_type());
  at::Tensor d(std::move(out));
  host_view(d).copy_(r);
  return d;
}

bool is_sim(const c10::IValue& v) { return v.isTensor() && v.toTensor().defined() && v.toTensor().device().type() == kSim; }

// Returns false (stack restored) where the copying fallback must run instead.
bool aliasing_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n_args = schema.arguments().size();
  const size_t base = stack->size() - n_args;
  std::vector<c10::IValue> saved(stack->begin() + base, stack->end());
  std::vector<Alias> aliases;
  std::vector<at::Tensor> host_inputs;
  auto alias = [&](const at::Tensor& t) {
    auto h = host_view(t);
    aliases.push_back({t, h});
    return h;
  };
  for (size_t i = base; i < stack->size(); ++i) {
    auto& v = (*stack)[i];
    if (is_sim(v)) {
      v = alias(v.toTensor());
    } else if (v.isTensor()) {
      host_inputs.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      c10::List<at::Tensor> list;
      for (at::Tensor t : v.toTensorList()) list.push_back(t.defined() && t.device().type() == kSim ? alias(t) : t);
      v = list;
    } else if (v.isOptionalTensorList()) {
      c10::List<std::optional<at::Tensor>> list;
      for (std::optional<at::Tensor> t : v.toOptionalTensorList()) {
        if (t && t->defined() && t->device().type() == kSim) t = alias(*t);
        list.push_back(t);
      }
      v = list;
    } else if (v.isDevice() && v.toDevice().type() == kSim) {
      v = c10::IValue(c10::Device(c10::kCPU));
    }
  }
  try {
    op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
  } catch (const c10::Error& e) {
    if (std::string(e.what()).find("Trying to resize storage that is not resizable") == std::string::npos) throw;
    stack->resize(std::min(stack->size(), base));
    for (auto& v : saved) stack->push_back(std::move(v));
    return false;
  }
  const size_t n_ret = schema.returns().size();
  for (size_t i = stack->size() - n_ret; i < stack->size(); ++i) {
    auto& v = (*stack)[i];
    if (v.isTensor()) {
      v = map_result(v.toTensor(), aliases, host_inputs);
    } else if (v.isTensorList()) {
      c10::List<at::Tensor> list;
      for (at::Tensor t : v.toTensorList()) list.push_back(map_result(t, aliases, host_inputs));
      v = list;
    }
  }
  return true;
}

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const bool outer = tl_in_fallback;
  tl_in_fallback = true;
  try {
    if (!aliasing_fallback(op, stack)) at::native::cpu_fallback(op, stack);
  } catch (...) {
    tl_in_fallback = outer;
    throw;
  }
  tl_in_fallback = outer;
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", at::native::as_strided_tensorimpl);
  m.impl("view", at::native::view);
  m.impl("_reshape_alias", at::native::_reshape_alias);
  m.impl("unfold", at::native::unfold);
  m.impl("resize_", resize_);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("set_.source_Storage_storage_offset", set_storage);
  m.impl("set_.source_Storage", set_storage_only);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("record_stream", record_stream);
  m.impl("_has_compatible_shallow_copy_type", compatible_shallow_copy);
  // convolution's generic kernel picks a backend by device and has none for an unknown one:
  // run it, and its backward, on the CPU like any other op.
  m.impl("convolution", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("convolution_backward", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  // Group and layer norm have device-generic (CompositeExplicitAutograd) kernels, which an
  // unknown device would get instead of the fallback: group norm's views its input flat and
  // fails on channels-last tensors that a GPU's kernel takes; layer norm's builds its result in
  // several ops and peaks at twice the output where a GPU's fused kernel allocates the output.
  // Run the CPU kernels, as a GPU runs its own.
  m.impl("native_group_norm", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("native_group_norm_backward", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("native_layer_norm", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("native_layer_norm_backward", torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>()); }

// scaled_dot_product_attention asks a per-device stub which kernel to use. An unknown device
// gets the math path, which materialises the whole attention matrix where a GPU's fused kernel
// would not; ask the CPU instead, whose fused kernel then runs through the fallback.
int64_t sdp_choice(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                   double dropout, bool causal, std::optional<double> scale, bool gqa) {
  std::optional<at::Tensor> m;
  if (mask && mask->defined()) m = host_view(*mask);
  return at::_fused_sdp_choice(host_view(q), host_view(k), host_view(v), m, dropout, causal, scale, gqa);
}

// ------------------------------------------------------------------------------ python ops
void init() {
  static std::once_flag once;
  std::call_once(once, [] {
    at::RegisterPrivateUse1HooksInterface(&g_hooks);
    c10::SetAllocator(kSim, &g_device_memory);
    at::setHostAllocator(kSim, &g_pinned_memory);
    at::globalContext().lazyInitDevice(kSim);  // is_pinned() answers only for an initialised device
  });
}

std::vector<std::string> counter_names() { return {kCounterNames, kCounterNames + kNumCounters}; }

std::vector<int64_t> counters() {
  std::vector<int64_t> out;
  for (auto& c : g_counters) out.push_back(c.load());
  return out;
}

void reset_counters() {
  for (auto& c : g_counters) c = 0;
}

}  // namespace simdev

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &simdev::sdp_choice)
}

TORCH_LIBRARY(autofit_simdev, m) {
  m.def("init() -> ()", &simdev::init);
  m.def("set_cap(int nbytes) -> ()", [](int64_t n) { simdev::g_device_memory.set_cap(n); });
  m.def("set_pinned_cap(int nbytes) -> ()", [](int64_t n) { simdev::g_pinned_memory.set_cap(n); });
  m.def("device_summary() -> int[]", [] { return simdev::g_device_memory.summary(); });
  m.def("pinned_summary() -> int[]", [] { return simdev::g_pinned_memory.summary(); });
  m.def("reset_peak() -> ()", [] {
    simdev::g_device_memory.resetPeakStats(0);
    simdev::g_pinned_memory.reset_peak_stats();
  });
  m.def("counter_names() -> str[]", &simdev::counter_names);
  m.def("counters() -> int[]", &simdev::counters);
  m.def("reset_counters() -> ()", &simdev::reset_counters);
  m.def("current_stream() -> int", [] { return static_cast<int64_t>(simdev::tl_stream); });
  m.def("set_stream(int id) -> ()", [](int64_t id) { simdev::tl_stream = id; });
}
