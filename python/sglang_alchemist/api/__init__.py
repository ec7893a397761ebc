"""HTTP-process side: routes added to SGLang's FastAPI app and the channel to the scheduler."""
