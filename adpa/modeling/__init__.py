"""Models and what runs them: loading (models), precision, LoRA, the head at the positions a stage
needs (lm_head), packed sequences and prompts computed once (prompt_cache).
"""
