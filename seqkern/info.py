"""`python -m seqkern.info`: versions, what seqkern._C was built with, usable backends."""
import platform

import torch

from seqkern import _extension, backends


def report():
    lines = [f"seqkern {__import__('seqkern').__version__}",
             f"python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'}), "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError as exc:
        lines.append(f"triton: not importable ({exc})")
    info = _extension.build_info()
    if info is None:
        lines.append(f"seqkern._C: not available ({_extension.load_error})")
    else:
        kernels_isa = torch.ops.seqkern_C.cpu_capability()
        lines.append(f"seqkern._C: built with g++ {info['compiler']} [{info['cpu_flags']}]; "
                     f"CPU kernels run as {kernels_isa}; CUDA kernels: "
                     f"{info['cuda_archs'] or 'not built'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"backends for {device} tensors (priority {backends.PRIORITY[device]}):")
        for name, reasons in backends.usable_report(device).items():
            lines.append(f"  {name:10s} " + ("usable" if not reasons else
                                               "unavailable: " + "; ".join(reasons)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
