// flowgrpo CUDA virtual-memory allocator: tagged regions whose physical memory can be released
// ("paused") and re-created ("resumed") at the same virtual addresses.
//
// Algorithm. Every allocation reserves a virtual address range (cuMemAddressReserve), creates
// physical memory (cuMemCreate) and maps it there (cuMemMap + cuMemSetAccess). It is recorded with
// the tag that was current when it was made. Pausing a tag copies each of its allocations to pinned
// host memory (optional), unmaps and releases the physical memory and keeps the address
// reservation; resuming creates new physical memory, maps it at the same address and copies the
// backup back. Tensors living there keep their data_ptr, so nothing that holds them (an optimizer's
// state dict, a model) needs to be re-bound.
//
// torch drives it as a pluggable allocator behind one `torch.cuda.MemPool` per tag
// (`flowgrpo_malloc` / `flowgrpo_free`); the control functions are called through ctypes
// (engine/allocator.py). The driver API is resolved at run time with dlopen("libcuda.so.1"), so the
// library builds with the toolkit headers only and loads on machines without a GPU (where
// `flowgrpo_vmm_init` reports why it cannot work).
//
// Simplifications: one physical chunk per allocation (no splitting); backups are synchronous
// copies after a device-wide synchronize; a region's tensors must not be touched while it is paused
// (the addresses are unmapped: the access would fault).

#include <cuda.h>
#include <dlfcn.h>
#include <sys/types.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

extern "C" {
typedef struct flowgrpo_vmm_stats_t {
  int64_t allocations;        // live allocations with the tag
  int64_t reserved_bytes;     // virtual address space they hold (granularity-padded)
  int64_t mapped_bytes;       // physical device memory currently mapped
  int64_t paused_bytes;       // reserved but unmapped (paused)
  int64_t host_backup_bytes;  // pinned host memory held for backups
} flowgrpo_vmm_stats_t;
}

namespace {

constexpr int kAbiVersion = 1;

thread_local std::string g_last_error;

void set_error(const std::string& message) { g_last_error = message; }

struct Driver {
  bool ok = false;
  std::string error;
  decltype(&::cuInit) init = nullptr;
  decltype(&::cuGetErrorString) get_error_string = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuCtxGetCurrent) ctx_get_current = nullptr;
  decltype(&::cuCtxSetCurrent) ctx_set_current = nullptr;
  decltype(&::cuCtxSynchronize) ctx_synchronize = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
  decltype(&::cuMemGetAllocationGranularity) get_granularity = nullptr;
  decltype(&::cuMemAddressReserve) address_reserve = nullptr;
  decltype(&::cuMemAddressFree) address_free = nullptr;
  decltype(&::cuMemCreate) create = nullptr;
  decltype(&::cuMemRelease) release = nullptr;
  decltype(&::cuMemMap) map = nullptr;
  decltype(&::cuMemUnmap) unmap = nullptr;
  decltype(&::cuMemSetAccess) set_access = nullptr;
  decltype(&::cuMemcpyDtoH_v2) copy_dtoh = nullptr;
  decltype(&::cuMemcpyHtoD_v2) copy_htod = nullptr;
  decltype(&::cuMemHostAlloc) host_alloc = nullptr;
  decltype(&::cuMemFreeHost) free_host = nullptr;
};

template <typename F>
bool resolve(void* lib, const char* name, F& out, std::string& error) {
  out = reinterpret_cast<F>(dlsym(lib, name));
  if (out == nullptr) {
    error = std::string("the CUDA driver library has no symbol ") + name + " (driver too old for the VMM API?)";
    return false;
  }
  return true;
}

Driver load_driver() {
  Driver d;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    d.error = std::string("cannot load the CUDA driver (libcuda.so.1): ") + (why ? why : "unknown dlopen error") +
              "; the VMM allocator needs an NVIDIA GPU and its driver";
    return d;
  }
  std::string& e = d.error;
  bool ok = resolve(lib, "cuInit", d.init, e) && resolve(lib, "cuGetErrorString", d.get_error_string, e) &&
            resolve(lib, "cuDeviceGet", d.device_get, e) && resolve(lib, "cuCtxGetCurrent", d.ctx_get_current, e) &&
            resolve(lib, "cuCtxSetCurrent", d.ctx_set_current, e) &&
            resolve(lib, "cuCtxSynchronize", d.ctx_synchronize, e) &&
            resolve(lib, "cuDevicePrimaryCtxRetain", d.primary_ctx_retain, e) &&
            resolve(lib, "cuMemGetAllocationGranularity", d.get_granularity, e) &&
            resolve(lib, "cuMemAddressReserve", d.address_reserve, e) &&
            resolve(lib, "cuMemAddressFree", d.address_free, e) && resolve(lib, "cuMemCreate", d.create, e) &&
            resolve(lib, "cuMemRelease", d.release, e) && resolve(lib, "cuMemMap", d.map, e) &&
            resolve(lib, "cuMemUnmap", d.unmap, e) && resolve(lib, "cuMemSetAccess", d.set_access, e) &&
            resolve(lib, "cuMemcpyDtoH_v2", d.copy_dtoh, e) && resolve(lib, "cuMemcpyHtoD_v2", d.copy_htod, e) &&
            resolve(lib, "cuMemHostAlloc", d.host_alloc, e) && resolve(lib, "cuMemFreeHost", d.free_host, e);
  if (!ok) return d;
  CUresult r = d.init(0);
  if (r != CUDA_SUCCESS) {
    const char* name = nullptr;
    d.get_error_string(r, &name);
    d.error = std::string("cuInit failed: ") + (name ? name : "unknown error") + " (error " + std::to_string(r) + ")";
    return d;
  }
  d.ok = true;
  return d;
}

const Driver& driver() {
  static const Driver d = load_driver();
  return d;
}

bool driver_ok() {
  const Driver& d = driver();
  if (!d.ok) set_error(d.error);
  return d.ok;
}

bool check(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return true;
  const char* name = nullptr;
  driver().get_error_string(r, &name);
  set_error(std::string(what) + " failed: " + (name ? name : "unknown error") + " (CUresult " + std::to_string(r) +
            ")");
  return false;
}

struct Allocation {
  CUdeviceptr ptr = 0;
  size_t size = 0;       // padded to the allocation granularity: what is reserved and mapped
  size_t requested = 0;  // what torch asked for: what a backup copies
  int device = 0;
  std::string tag;
  CUmemGenericAllocationHandle handle = 0;
  bool mapped = false;
  void* host = nullptr;  // pinned backup buffer (owned)
  bool host_valid = false;
};

struct State {
  std::mutex mu;
  std::unordered_map<CUdeviceptr, Allocation> allocations;
  std::unordered_map<int, size_t> granularity;
  std::string current_tag = "default";
};

State& state() {
  static State* s = new State();  // never destroyed: torch may free memory during interpreter teardown
  return *s;
}

CUmemAllocationProp device_prop(int device) {
  CUmemAllocationProp prop;
  std::memset(&prop, 0, sizeof(prop));
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  return prop;
}

// torch calls the allocator with the device's primary context current; calls through ctypes may
// come from a thread that never touched CUDA, so make the primary context current there.
bool ensure_context(int device) {
  const Driver& d = driver();
  CUcontext ctx = nullptr;
  if (!check(d.ctx_get_current(&ctx), "cuCtxGetCurrent")) return false;
  if (ctx != nullptr) return true;
  CUdevice dev;
  if (!check(d.device_get(&dev, device), "cuDeviceGet")) return false;
  if (!check(d.primary_ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain")) return false;
  return check(d.ctx_set_current(ctx), "cuCtxSetCurrent");
}

bool granularity_of(State& s, int device, size_t* out) {
  auto it = s.granularity.find(device);
  if (it != s.granularity.end()) {
    *out = it->second;
    return true;
  }
  CUmemAllocationProp prop = device_prop(device);
  size_t g = 0;
  if (!check(driver().get_granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
             "cuMemGetAllocationGranularity"))
    return false;
  s.granularity[device] = g;
  *out = g;
  return true;
}

// Create physical memory for `a` and map it read-write at a.ptr.
bool map_physical(Allocation& a) {
  const Driver& d = driver();
  CUmemAllocationProp prop = device_prop(a.device);
  CUmemGenericAllocationHandle handle = 0;
  if (!check(d.create(&handle, a.size, &prop, 0), "cuMemCreate")) return false;
  if (!check(d.map(a.ptr, a.size, 0, handle, 0), "cuMemMap")) {
    d.release(handle);
    return false;
  }
  CUmemAccessDesc access;
  std::memset(&access, 0, sizeof(access));
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  if (!check(d.set_access(a.ptr, a.size, &access, 1), "cuMemSetAccess")) {
    d.unmap(a.ptr, a.size);
    d.release(handle);
    return false;
  }
  a.handle = handle;
  a.mapped = true;
  return true;
}

bool unmap_physical(Allocation& a) {
  const Driver& d = driver();
  if (!check(d.unmap(a.ptr, a.size), "cuMemUnmap")) return false;
  if (!check(d.release(a.handle), "cuMemRelease")) return false;
  a.handle = 0;
  a.mapped = false;
  return true;
}

void free_host(Allocation& a) {
  if (a.host != nullptr) driver().free_host(a.host);
  a.host = nullptr;
  a.host_valid = false;
}

bool tag_matches(const Allocation& a, const char* tag) { return tag == nullptr || a.tag == tag; }

}  // namespace

extern "C" {

int flowgrpo_vmm_abi_version(void) { return kAbiVersion; }

// 0 when the driver is loaded and the VMM API resolved; otherwise -1 and the reason in last_error.
int flowgrpo_vmm_init(void) { return driver_ok() ? 0 : -1; }

const char* flowgrpo_vmm_last_error(void) { return g_last_error.c_str(); }

int flowgrpo_vmm_set_tag(const char* tag) {
  if (tag == nullptr || tag[0] == '\0') {
    set_error("the tag must be a non-empty string");
    return -1;
  }
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.current_tag = tag;
  return 0;
}

// Copies the current tag into buf (NUL-terminated, truncated to n-1 bytes); returns its length.
int flowgrpo_vmm_get_tag(char* buf, size_t n) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (buf != nullptr && n > 0) {
    size_t k = s.current_tag.size() < n - 1 ? s.current_tag.size() : n - 1;
    std::memcpy(buf, s.current_tag.data(), k);
    buf[k] = '\0';
  }
  return static_cast<int>(s.current_tag.size());
}

void* flowgrpo_malloc(ssize_t size, int device, CUstream stream) {
  (void)stream;  // physical memory is not stream-ordered; torch's caching allocator orders reuse
  if (size <= 0) {
    set_error("flowgrpo_malloc: size must be positive, got " + std::to_string(size));
    return nullptr;
  }
  if (!driver_ok() || !ensure_context(device)) return nullptr;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  size_t g = 0;
  if (!granularity_of(s, device, &g)) return nullptr;
  Allocation a;
  a.requested = static_cast<size_t>(size);
  a.size = (a.requested + g - 1) / g * g;
  a.device = device;
  a.tag = s.current_tag;
  if (!check(driver().address_reserve(&a.ptr, a.size, g, 0, 0), "cuMemAddressReserve")) return nullptr;
  if (!map_physical(a)) {
    driver().address_free(a.ptr, a.size);
    return nullptr;
  }
  s.allocations.emplace(a.ptr, a);
  return reinterpret_cast<void*>(a.ptr);
}

void flowgrpo_free(void* ptr, ssize_t size, int device, CUstream stream) {
  (void)size;
  (void)stream;
  if (ptr == nullptr || !driver_ok()) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.allocations.find(reinterpret_cast<CUdeviceptr>(ptr));
  if (it == s.allocations.end()) {
    std::fprintf(stderr, "flowgrpo_vmm: free of unknown pointer %p on device %d ignored\n", ptr, device);
    return;
  }
  Allocation a = it->second;
  s.allocations.erase(it);
  const Driver& d = driver();
  if (ensure_context(a.device)) {
    if (a.mapped) {
      // Kernels still in flight may read the block torch just released; unmapping under them faults.
      d.ctx_synchronize();
      unmap_physical(a);
    }
    d.address_free(a.ptr, a.size);
  }
  free_host(a);
}

// Release the physical memory of every mapped allocation with `tag` (NULL: all tags), copying
// contents to pinned host memory first when `backup` is non-zero. Addresses stay reserved.
// Returns 0 or -1 (last_error); allocations processed before a failure stay paused.
int flowgrpo_vmm_pause(const char* tag, int backup) {
  if (!driver_ok()) return -1;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  const Driver& d = driver();
  bool synced = false;
  for (auto& kv : s.allocations) {
    Allocation& a = kv.second;
    if (!tag_matches(a, tag) || !a.mapped) continue;
    if (!synced) {
      if (!ensure_context(a.device) || !check(d.ctx_synchronize(), "cuCtxSynchronize")) return -1;
      synced = true;
    }
    if (backup) {
      if (a.host == nullptr &&
          !check(d.host_alloc(&a.host, a.requested, CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc (pinned backup)"))
        return -1;
      if (!check(d.copy_dtoh(a.host, a.ptr, a.requested), "cuMemcpyDtoH (backup)")) return -1;
      a.host_valid = true;
    } else {
      a.host_valid = false;
    }
    if (!unmap_physical(a)) return -1;
  }
  return 0;
}

// Map new physical memory under every paused allocation with `tag` (NULL: all tags), at the same
// addresses, and restore backed-up contents. Pinned backups are freed unless `keep_host_backup`.
int flowgrpo_vmm_resume(const char* tag, int keep_host_backup) {
  if (!driver_ok()) return -1;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  const Driver& d = driver();
  for (auto& kv : s.allocations) {
    Allocation& a = kv.second;
    if (!tag_matches(a, tag) || a.mapped) continue;
    if (!ensure_context(a.device) || !map_physical(a)) return -1;
    if (a.host_valid) {
      if (!check(d.copy_htod(a.ptr, a.host, a.requested), "cuMemcpyHtoD (restore)")) return -1;
      a.host_valid = false;
    }
    if (!keep_host_backup) free_host(a);
  }
  return 0;
}

// Free the pinned backup buffers kept by `resume(..., keep_host_backup=1)` for `tag` (NULL: all).
int flowgrpo_vmm_release_host(const char* tag) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  for (auto& kv : s.allocations) {
    Allocation& a = kv.second;
    if (tag_matches(a, tag) && !a.host_valid) free_host(a);
  }
  return 0;
}

int flowgrpo_vmm_stats(const char* tag, flowgrpo_vmm_stats_t* out) {
  if (out == nullptr) {
    set_error("flowgrpo_vmm_stats: out must not be NULL");
    return -1;
  }
  std::memset(out, 0, sizeof(*out));
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  for (const auto& kv : s.allocations) {
    const Allocation& a = kv.second;
    if (!tag_matches(a, tag)) continue;
    out->allocations += 1;
    out->reserved_bytes += static_cast<int64_t>(a.size);
    if (a.mapped) {
      out->mapped_bytes += static_cast<int64_t>(a.size);
    } else {
      out->paused_bytes += static_cast<int64_t>(a.size);
    }
    if (a.host != nullptr) out->host_backup_bytes += static_cast<int64_t>(a.requested);
  }
  return 0;
}

// Writes up to `n` allocation base addresses with `tag` (NULL: all) into `out`; returns the count
// of matching allocations (which may exceed n).
int64_t flowgrpo_vmm_allocations(const char* tag, uint64_t* out, int64_t n) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t count = 0;
  for (const auto& kv : s.allocations) {
    if (!tag_matches(kv.second, tag)) continue;
    if (out != nullptr && count < n) out[count] = static_cast<uint64_t>(kv.first);
    ++count;
  }
  return count;
}

}  // extern "C"
