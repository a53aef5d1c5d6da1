"""Run by test_packaged_model.py in its own process: greedy continuations from vLLM (CPU) and HF."""

import json
import sys

from serving.vllm_settings import set_cpu_engine_env

set_cpu_engine_env()  # before vLLM is imported

if __name__ == "__main__":
    model_dir, out = sys.argv[1], sys.argv[2]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are concise."}, {"role": "user", "content": "Explain photosynthesis."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}],
    ]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=24))
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]

    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    hf_ids = []
    for p in prompts:
        g = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)
        hf_ids.append(g[0, len(p):].tolist())
    json.dump({"vllm": vllm_ids, "hf": hf_ids, "eos": tok.eos_token_id}, open(out, "w"))
