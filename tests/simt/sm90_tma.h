// sm90 emulator: TMA (cp.async.bulk.tensor load / store with swizzle and OOB fill, bulk groups, async-proxy fence).
// Included by sm90_prelude.h after sm90_emu.h (sm90 spike builds only). Not written yet.
#pragma once
