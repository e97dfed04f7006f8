"""Development tools of the EPD pack (never imported by ComfyUI at run time)."""
