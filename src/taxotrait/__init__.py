"""taxotrait: Prompt-CAM trait discovery at every rank of a taxonomy."""
