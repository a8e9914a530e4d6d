"""Checks a Lambda bootstrap binary without `file` or `objdump` (a fresh CI machine may lack
them): an x86-64 ELF executable that names no glibc symbol version newer than the limit.
Prints the newest version found. Usage: check-elf.py BINARY MAX_GLIBC"""
import re
import sys

path, limit_text = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
if data[:4] != b"\x7fELF" or data[4] != 2 or int.from_bytes(data[18:20], "little") != 62:
    sys.exit(f"{path}: not an x86-64 ELF executable")
versions = sorted(
    {tuple(map(int, v.split(b"."))) for v in re.findall(rb"GLIBC_(\d+(?:\.\d+)+)", data)}
)
newest = ".".join(map(str, versions[-1])) if versions else "none"
limit = tuple(map(int, limit_text.split(".")))
if versions and versions[-1] > limit:
    sys.exit(f"{path}: needs glibc {newest}, newer than provided.al2023's {limit_text}")
print(newest)
