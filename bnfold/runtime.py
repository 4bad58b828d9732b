"""ONNX Runtime session options shared by the sessions of one bnfold job.

Why one process-wide arena: a job builds many sessions — one per BN level, then the signals'
before/after models, then the verification's — and a session's own arena goes back to the OS when
it closes, so each new session would page-fault its working memory in again. On the 2-core dev
machine a fault costs 0.4–2 s per GiB, erratically: a 64-sample mobilenet_v2 pass right after a
recalibration took 0.4–1.2 s with its own arena, 0.24 s with the shared one (bench/RESULTS.md §5).
An arena registered with the ORT environment outlives the sessions; the memory stays with the
process (a job's process: the service runs jobs in worker processes). Sessions of the caller's
own are unaffected unless they opt in the same way.
"""

from __future__ import annotations

import onnxruntime as ort

_shared_arena = False


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Silent logs (failures surface as one BnfoldError, not as ORT's log lines too), `threads`
    intra-op threads (0: one per core), and the process-wide CPU arena."""
    global _shared_arena
    if not _shared_arena:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _shared_arena = True
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options
