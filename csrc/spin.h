// A CPU hint for busy-wait loops: lets the sibling hyperthread run and saves power.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEEDGE_PAUSE() _mm_pause()
#else
#include <thread>
#define MOEEDGE_PAUSE() std::this_thread::yield()
#endif
