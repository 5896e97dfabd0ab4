// sm90 emulator: wgmma (warp-group MMA: fence, mma_async, commit_group, wait_group).
// Included by sm90_prelude.h after sm90_emu.h (sm90 spike builds only). Not written yet.
#pragma once
