"""ComfyUI nodes of the EPD pack (imports ComfyUI; the core in epd_core does not)."""
