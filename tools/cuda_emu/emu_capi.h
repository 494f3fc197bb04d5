// SPDX-License-Identifier: Apache-2.0
// The C API the ctypes-driven emulator libraries (eviction_emu.cpp,
// quant_emu.cpp; driven by tools/cuda_emu/emu_build.py's EmuLibrary) share:
// parameter structs filled field by field by name, the readable buffers, the
// launches and the error text of the last run. Include it once, after
// emu_runtime.h and the kernel headers, in a single-file shared library.
#pragma once

#include <type_traits>

#include "emu_runtime.h"

#define KVKERN_EXPORT extern "C" __attribute__((visibility("default")))

namespace kvkern_emu {
enum Kind { kPtr, kI64, kI32, kF32, kBool };
struct Field {
  const char* name;
  size_t off;
  Kind kind;
};
template <typename T>
constexpr Kind kind_of() {
  if constexpr (std::is_pointer_v<T>) return kPtr;
  else if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, size_t>) return kI64;
  else if constexpr (std::is_same_v<T, float>) return kF32;
  else if constexpr (std::is_same_v<T, bool>) return kBool;
  else return kI32;  // int and the int-based enums
}
// Member `member` of struct S, under the name `name`.
#define KVKERN_EMU_FIELD_AS(S, name, member) \
  ::kvkern_emu::Field { name, offsetof(S, member), ::kvkern_emu::kind_of<std::remove_cv_t<decltype(S::member)>>() }
#define KVKERN_EMU_FIELD(S, member) KVKERN_EMU_FIELD_AS(S, #member, member)
// KVKERN_EMU_FIELDS(S, a, b, ...): KVKERN_EMU_FIELD(S, a), KVKERN_EMU_FIELD(S, b), ...
// (a __VA_OPT__ recursion, rescanned up to 256 times: so many members at most).
#define KVKERN_EMU_FIELDS(S, ...) __VA_OPT__(KVKERN_EMU_EXP4(KVKERN_EMU_FIELDS_STEP(S, __VA_ARGS__)))
#define KVKERN_EMU_FIELDS_STEP(S, m, ...) \
  KVKERN_EMU_FIELD(S, m), __VA_OPT__(KVKERN_EMU_FIELDS_AGAIN KVKERN_EMU_PARENS(S, __VA_ARGS__))
#define KVKERN_EMU_FIELDS_AGAIN() KVKERN_EMU_FIELDS_STEP
#define KVKERN_EMU_PARENS ()
#define KVKERN_EMU_EXP4(...) KVKERN_EMU_EXP3(KVKERN_EMU_EXP3(KVKERN_EMU_EXP3(KVKERN_EMU_EXP3(__VA_ARGS__))))
#define KVKERN_EMU_EXP3(...) KVKERN_EMU_EXP2(KVKERN_EMU_EXP2(KVKERN_EMU_EXP2(KVKERN_EMU_EXP2(__VA_ARGS__))))
#define KVKERN_EMU_EXP2(...) KVKERN_EMU_EXP1(KVKERN_EMU_EXP1(KVKERN_EMU_EXP1(KVKERN_EMU_EXP1(__VA_ARGS__))))
#define KVKERN_EMU_EXP1(...) __VA_ARGS__

inline const std::vector<Field> kOptionFields = {
    KVKERN_EMU_FIELDS(Options, seed, deferred, check_reads, block_order, smem_limit)};

// Where fields of one struct live: the table and the struct's address.
struct FieldTable {
  const std::vector<Field>* fields;
  void* base;
};

inline std::string g_error;  // emu_error()

// Sets field `name` of the first table that has it (a pointer or a number,
// as `is_ptr` says); 0, or -1 with g_error set.
inline int set_field(std::initializer_list<FieldTable> tables, const char* name, double value, void* ptr, bool is_ptr,
                     const std::string& owner) {
  for (const FieldTable& t : tables)
    for (const Field& f : *t.fields) {
      if (std::strcmp(f.name, name) != 0) continue;
      if ((f.kind == kPtr) != is_ptr) break;
      unsigned char* at = static_cast<unsigned char*>(t.base) + f.off;
      switch (f.kind) {
        case kPtr: std::memcpy(at, &ptr, sizeof(ptr)); break;
        case kI64: { const int64_t v = static_cast<int64_t>(value); std::memcpy(at, &v, 8); break; }
        case kI32: { const int v = static_cast<int>(value); std::memcpy(at, &v, 4); break; }
        case kF32: { const float v = static_cast<float>(value); std::memcpy(at, &v, 4); break; }
        case kBool: { const bool v = value != 0; std::memcpy(at, &v, 1); break; }
      }
      return 0;
    }
  g_error = std::string("no ") + (is_ptr ? "pointer" : "numeric") + " field '" + name + "' in " + owner;
  return -1;
}

// emu_run's status: 0 ok, 1 violations or a failed launch (g_error says
// which), 2 refused (cudaErrorInvalidValue before anything was launched).
inline int finish(cudaError_t err) {
  std::string msg = violations_text();
  if (err != cudaSuccess) msg = std::string("launch sequence returned ") + cudaGetErrorName(err) + "\n" + msg;
  g_error = msg;
  if (err == cudaErrorInvalidValue && g_violations.count == 0) return 2;
  return msg.empty() ? 0 : 1;
}
}  // namespace kvkern_emu

// cudaGetErrorName is in the CUDA runtime library, which is not linked.
extern "C" const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError(other)";
  }
}

// Registers a buffer the kernels may read through cp.async / __ldg.
KVKERN_EXPORT void emu_allow(const void* ptr, size_t bytes) { kvkern_emu::allow(ptr, bytes); }
KVKERN_EXPORT void emu_clear_allowed() { kvkern_emu::clear_allowed(); }
KVKERN_EXPORT const char* emu_error() { return kvkern_emu::g_error.c_str(); }
// A text line per launch of the last run: "name blocks threads smem".
KVKERN_EXPORT const char* emu_launches() {
  static std::string s;
  s.clear();
  for (const auto& l : kvkern_emu::g_launches)
    s += l.kernel + " " + std::to_string(l.blocks) + " " + std::to_string(l.threads) + " " + std::to_string(l.smem) +
         "\n";
  return s.c_str();
}
