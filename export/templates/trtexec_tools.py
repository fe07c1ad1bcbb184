#!/usr/bin/env python3
"""Finding ``trtexec`` and its TensorRT major version on a device: shared by the TensorRT build kit
(``build_engine.sh``) and the latency calibration kit (``measure.py``), copied beside each.

Stand-alone (standard library only). Usage:
  python3 trtexec_tools.py find           print the trtexec to use; exit 2 with one line if there is none
  python3 trtexec_tools.py major TRTEXEC  print TensorRT's major version (nothing when it cannot be read)
"""

import os
import re
import shutil
import subprocess
import sys

#: JetPack's trtexec, which is on no PATH by default.
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
NOT_FOUND = "no trtexec found (looked at $TRTEXEC, the PATH and /usr/src/tensorrt/bin); install TensorRT or set TRTEXEC"


def find_trtexec():
    """``$TRTEXEC``, else ``trtexec`` on the PATH, else JetPack's; None when none is an executable file."""
    for candidate in (os.environ.get("TRTEXEC"), shutil.which("trtexec"), JETPACK_TRTEXEC):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def trtexec_major(trtexec):
    """TensorRT's major version from ``trtexec --help`` ("TensorRT v100300" -> 10); None if unreadable."""
    try:
        out = subprocess.run([trtexec, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"TensorRT v(\d+)", out.stdout + out.stderr)
    if not found:
        return None
    v = int(found.group(1))
    return v // 10000 if v >= 10000 else v // 1000


def main(argv):
    if argv[:1] == ["find"] and len(argv) == 1:
        found = find_trtexec()
        if found is None:
            print(f"error: {NOT_FOUND}", file=sys.stderr)
            return 2
        print(found)
        return 0
    if argv[:1] == ["major"] and len(argv) == 2:
        major = trtexec_major(argv[1])
        print("" if major is None else major)
        return 0
    usage = __doc__.strip().split("\n\n")[-1]
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
