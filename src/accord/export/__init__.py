"""What a run writes for other tools: training metadata in the safetensors headers (:mod:`.metadata`),
ComfyUI-keyed LoRAs for transformer models (:mod:`.comfy`) and the run folder's README (:mod:`.readme`)."""
