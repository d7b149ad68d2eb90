"""Shipping what a run trained: one merged model (`merge`), written as a standalone Hugging Face
directory (`hf`) or as a GGUF file for llama.cpp and Ollama (`gguf`, `ollama`), through staged
outputs that never replace what tuneplex did not write (`output`)."""
