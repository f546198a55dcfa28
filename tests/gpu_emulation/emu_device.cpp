// emu_device.h on top of the emulated runtime (compiled once per emulated
// target, like the cuda/src units it goes with).
#include "emu_compat.h"  // first: stands in for gpu_compat.h

#include "emu_device.h"

#include <new>

namespace emu_device {

void* alloc(size_t bytes) {
  void* p = nullptr;
  if (emu::device_alloc(&p, bytes) != gpuSuccess) throw std::bad_alloc();
  return p;
}
void free(void* p) { (void)emu::device_free(p); }
int64_t live_bytes() { return emu::live_bytes; }
size_t live_buffers() { return emu::device_buffers.size(); }
void fail_allocation_after(int skip) { emu::fail_after = skip; }
int warp_size() { return kWarpSize; }
bool tensor_cores() { return EMU_TC != 0; }
int64_t launches(const char* prefix) {
  int64_t count = 0;
  for (const std::string& name : emu::launched) count += name.rfind(prefix, 0) == 0 ? 1 : 0;
  return count;
}

int64_t overlapped_launches() { return emu::overlapped_launches; }
std::vector<std::vector<unsigned>> take_unsigned_atomic_adds() {
  std::vector<const void*> addresses;
  std::vector<std::vector<unsigned>> values;
  for (const auto& [address, old] : emu::unsigned_atomic_adds) {
    const auto it = std::find(addresses.begin(), addresses.end(), address);
    if (it == addresses.end()) {
      addresses.push_back(address);
      values.push_back({old});
    } else {
      values[static_cast<size_t>(it - addresses.begin())].push_back(old);
    }
  }
  emu::unsigned_atomic_adds.clear();
  return values;
}

}  // namespace emu_device
