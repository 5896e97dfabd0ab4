// sm90 emulator: the shared-memory warp collectives of the Hopper epilogue, as the sm90 overlay
// routes cute's atoms (sm90_overlay.py): stmatrix (SM90_U32x{1,2,4}_STSM_N, SM90_U16x{2,4,8}_STSM_T)
// and ldmatrix (SM75_U32x{1,2,4}_LDSM_N, SM75_U16x{2,4,8}_LDSM_T) on simt_emu.h's warp-collective
// ldmatrix / stmatrix (their layouts are checked against cute's traits in selftest.cpp).
// Included by sm90_prelude.h after sm90_tma.h (sm90 spike builds only).
#pragma once

namespace ostq_emu {
namespace sm90 {

// stmatrix writes through the generic proxy: each lane's bytes are marked for the async-proxy
// shadow (sm90_tma.h), which a TMA store of them checks for a fence.proxy.async in between.
inline void stmatrix(const unsigned* s, int count, bool trans, void* ptr) {
  ::ostq_emu::stmatrix(s, count, trans, ptr);
  void* rows[kWarpSize];
  // the row addresses again (a second collective of the same warp, right after the first)
  warp_exchange(0xffffffffu, ptr, "stmatrix (proxy marks)", rows);
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  for (int j = 0; j < count; ++j) {
    auto* row0 = static_cast<unsigned char*>(rows[8 * j + (trans ? 2 * t : g)]);
    auto* row1 = static_cast<unsigned char*>(rows[8 * j + (trans ? 2 * t + 1 : g)]);
    if (trans) {
      proxy_generic_write(row0 + 2 * g, 2), proxy_generic_write(row1 + 2 * g, 2);
    } else {
      proxy_generic_write(row0 + 4 * t, 4);
    }
  }
}

inline void ldmatrix(unsigned* d, int count, bool trans, const void* ptr) {
  ::ostq_emu::ldmatrix(d, count, trans, ptr);
}

}  // namespace sm90
}  // namespace ostq_emu
