// lowmcgm.memory.shim compiles this file once per torch version (see ensure_shim()) and loads it
// with ctypes BEFORE `import torch`, in a subprocess of its own: it changes the process for good.
//
// Makes a CPU-only PyTorch build pretend that CUDA exists, so that FakeTensors
// with device='cuda' can go through autograd (forward+backward) without a GPU.
// (1) no-op DeviceGuardImpl for DeviceType::CUDA (autograd InputMetadata needs it)
// (2) CUDAHooks reporting hasCUDA()==true (autograd engine calls getAccelerator(true))
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
using FakeCUDAGuardImpl = c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>;
C10_REGISTER_GUARD_IMPL(CUDA, FakeCUDAGuardImpl);
namespace fakecuda {
struct CUDAHooks : public at::CUDAHooksInterface {
  CUDAHooks(at::CUDAHooksArgs) {}
  void init() const override {}
  bool hasCUDA() const override { return true; }
  bool isAvailable() const override { return true; }
  bool isBuilt() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex current_device() const override { return 0; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex) const override { return 0; }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex) const override { return 0; }
  int getNumGPUs() const override { return 1; }
};
}
namespace at {
using CUDAHooks = fakecuda::CUDAHooks;
REGISTER_CUDA_HOOKS(CUDAHooks);
}
