"""The model: NF4 quantization, the dynamic-rank LoRA layer and its math, ranks, loading, memory."""
