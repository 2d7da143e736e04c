"""Print the CMake flags for a llama.cpp CPU build that matches this machine's CPU.

A -march=native build is unsafe here: some VMs advertise AMX and fault on it, and a wheel
built with one CPU's extensions (AVX-VNNI, AVX-512...) dies with SIGILL on a CPU that lacks
them. So the flags are derived from the features the kernel reports, AMX always off, and
the wheel cache is keyed by these flags (scripts/build_llama.sh), so a machine with other
features gets its own build.
"""

from __future__ import annotations

import platform
import sys

# (cpuinfo flag, GGML option); every option not listed for this CPU is turned off.
X86_FEATURES = [
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
]
ALWAYS = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF"]


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args(flags: set[str]) -> list[str]:
    args = list(ALWAYS)
    for flag, option in X86_FEATURES:
        args.append(f"-D{option}={'ON' if flag in flags else 'OFF'}")
    return args


def main() -> int:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(" ".join(ALWAYS[4:]))  # other architectures: llama.cpp's native defaults
        return 0
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = cpu_flags(f.read())
    except OSError:
        flags = set()
    print(" ".join(cmake_args(flags)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
