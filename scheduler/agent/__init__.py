"""The node agent: samples GPUs through NVML, serves DCGM-compatible metrics, publishes the node's GPU inventory."""
