"""Serving models to the rest of the code: processes, ports and vLLM's settings on this machine.

ports.py           free_port / free_ports on 127.0.0.1 (process groups, servers, tests)
vllm_settings.py   how a vLLM engine is built here: CPU environment, dtype, scheduler and server flags
openai_server.py   VLLMServer: an OpenAI-compatible vLLM server on 127.0.0.1, started and stopped robustly

A leaf package: it imports neither ``models`` nor the stages, and importing it loads no vLLM.
"""
