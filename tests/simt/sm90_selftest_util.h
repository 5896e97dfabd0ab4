// What the sm90 self-test programs (sm90_selftest.cpp, sm90_tma_selftest.cpp,
// sm90_wgmma_selftest.cpp) share: a failure count and report, and the emulator's error message
// of a call ("" when it ran through).
#pragma once

#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>

namespace ostq_selftest {

inline int g_fail = 0;

inline void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_fail;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

inline bool has(const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; }

}  // namespace ostq_selftest
