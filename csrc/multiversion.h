// CPU kernels' target clones, shared by every C++ (CPU) op file.
//
// The JIT build has no -march flag, so x86-64 code would be SSE2 only: a kernel entry
// point marked PYMETA_MULTIVERSION is also compiled for AVX2 + FMA (x86-64-v3) and the
// loader picks the clone the CPU runs (GCC function multiversioning; the default clone
// is the portable path, the same loops at SSE2 width). target_clones wants plain
// functions, not templates, and clones only what it compiles itself: whatever an entry
// point calls must be inlined into it (PYMETA_INLINE), or it runs the default code.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYMETA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYMETA_MULTIVERSION
#endif

// PYMETA_LAMBDA_INLINE: the same for a lambda, after its parameter list.
#if defined(__GNUC__)
#define PYMETA_INLINE inline __attribute__((always_inline))
#define PYMETA_LAMBDA_INLINE __attribute__((always_inline))
#else
#define PYMETA_INLINE inline
#define PYMETA_LAMBDA_INLINE
#endif
