// One translation unit: the emulation layer, the unchanged kernels, the launcher.
#include "emu.h"
#include "kernels.cu"
#include "launch.cpp"
