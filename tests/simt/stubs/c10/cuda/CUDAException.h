// SIMT emulator stand-in for c10/cuda/CUDAException.h.
#pragma once
#include <c10/util/Exception.h>
