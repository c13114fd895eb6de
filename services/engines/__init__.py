"""Engine adapters (llama.cpp, vLLM, remote upstreams) and child-process control."""
