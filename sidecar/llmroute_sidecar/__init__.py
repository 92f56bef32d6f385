"""llmroute sidecar: keeps an app's LLM features up when one provider has a bad hour.

Data flows one way: request -> route -> strategy -> attempts via provider adapters -> answer.
The policy model (`policy`) is owned here; the operator imports it.
"""

__version__ = "0.1.0"
