"""Blob files: the local blob folder, scatter reads into fresh arrays, the safetensors layout, the I/O pool."""
