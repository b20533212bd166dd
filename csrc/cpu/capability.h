// The namespace that code compiled with ISA flags lives in.
//
// An inline function (or template) with external linkage that is compiled in two files with
// different -m flags is still one symbol to the linker, which keeps an arbitrary copy: the AVX-512
// build of a helper could then run on an AVX2-only CPU. So every helper that ISA-flagged files share
// through a header is defined inside sparsenet::cpu::SPARSENET_CPU_CAPABILITY, which CMake sets per
// source file to the ISA it is compiled for (avx2, avx512, fallback; baseline for everything else),
// as PyTorch does with CPU_CAPABILITY. tests/ops/test_isa_symbols.py checks the object files for it.
#pragma once

#ifndef SPARSENET_CPU_CAPABILITY
#define SPARSENET_CPU_CAPABILITY baseline
#endif
