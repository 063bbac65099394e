"""vLLM servers as the scheduler sees them: over HTTP only (`client`), and a faithful fake of one for tests (`fake`).

Nothing here imports vLLM: it needs a GPU and a multi-GB CUDA stack, and the scheduler only reads what a server
exposes (`/health`, `/v1/models`, `/metrics`, the sleep-mode endpoints).
"""
