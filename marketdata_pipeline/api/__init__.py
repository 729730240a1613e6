"""The read API (`marketdata serve`): the warehouse for consumers, behind the API keys."""
