// Runtime flags to template parameters (after flash-attention's static_switch.h): each branch
// names a compile-time constant and calls the lambda body with it in scope.
#pragma once

#define HM_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr bool CONST_NAME = true;       \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr bool CONST_NAME = false;      \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// Head dims are bucketed: 8..64 run the 64 kernels, 72..128 the 128 ones (loads beyond the real
// head dim are zero-filled and its stores masked).
#define HM_HEADDIM_SWITCH(HEAD_DIM, CONST_NAME, ...) \
  [&] {                                              \
    if ((HEAD_DIM) <= 64) {                          \
      constexpr int CONST_NAME = 64;                 \
      return __VA_ARGS__();                          \
    } else {                                         \
      constexpr int CONST_NAME = 128;                \
      return __VA_ARGS__();                          \
    }                                                \
  }()

#define HM_HALF_SWITCH(IS_BF16, TYPE_NAME, ...) \
  [&] {                                         \
    if (IS_BF16) {                              \
      using TYPE_NAME = __nv_bfloat16;          \
      return __VA_ARGS__();                     \
    } else {                                    \
      using TYPE_NAME = __half;                 \
      return __VA_ARGS__();                     \
    }                                           \
  }()
