"""The extension's build record: how setup.py writes the CUDA architecture list and how it is read back.

Pure functions with no imports beyond the standard library, so setup.py can load this file by path
before the package (and its compiled extension) exists.
"""

import json
import re

FIELDS = ("cuda", "cuda_version", "cuda_arch_list", "torch_version")


def parse_arch_list(text):
    """CUDA architectures from a TORCH_CUDA_ARCH_LIST-style string, in order: '8.0;9.0+PTX' and
    '8.0 9.0+PTX' both give ['8.0', '9.0+PTX']; an empty string (a CPU-only build) gives []."""
    if not isinstance(text, str):
        raise TypeError(f"an arch list must be a str, got {type(text).__name__}")
    return [arch for arch in re.split(r"[;,\s]+", text) if arch]


def parse_build_info(text):
    """build_info()'s dict from the extension's JSON build record (an object of strings, FIELDS)."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"mmdet_dcnv2's build record is not valid JSON ({error}): {text!r}") from None
    if not isinstance(fields, dict) or not all(isinstance(fields.get(key), str) for key in FIELDS):
        raise ValueError(f"mmdet_dcnv2's build record must be a JSON object of strings {FIELDS}: {text!r}")
    return {
        "cuda": fields["cuda"] == "1",
        "cuda_version": fields["cuda_version"] or None,
        "cuda_arch_list": parse_arch_list(fields["cuda_arch_list"]),
        "torch_version": fields["torch_version"],
    }


def arch_list_from_gencode_flags(flags):
    """The architectures nvcc flags compile, as TORCH_CUDA_ARCH_LIST entries: '-gencode=arch=compute_90,
    code=sm_90' gives '9.0'; an extra 'code=compute_90' (PTX kept for newer GPUs to JIT) makes it '9.0+PTX'.
    Sorted by architecture, so the list records what was compiled whatever order the flags came in."""
    binaries, ptx = set(), set()
    for flag in flags:
        match = re.fullmatch(r"-gencode=?arch=compute_(\w+),code=(sm|compute)_(\w+)", flag.replace(" ", ""))
        if match is None:
            raise ValueError(f"not an nvcc -gencode flag: {flag!r}")
        (binaries if match.group(2) == "sm" else ptx).add(match.group(3))

    def version(code):  # '90' -> '9.0', '100' -> '10.0', '90a' -> '9.0a'
        digits = re.match(r"\d+", code).group(0)
        return f"{digits[:-1]}.{digits[-1]}{code[len(digits) :]}"

    def key(code):
        digits = re.match(r"\d+", code).group(0)
        return int(digits), code

    return [version(code) + ("+PTX" if code in ptx else "") for code in sorted(binaries | ptx, key=key)]
