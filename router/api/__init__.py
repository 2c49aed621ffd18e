"""One module of routes per API family; each translates its wire schema into a `SpeechJob` and
Chorus's errors into its own error shape."""
