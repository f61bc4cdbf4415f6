"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

protocol.py validates the request and translates it into chat messages and an OutputSpec;
serving.py turns it into one GenerationRequest and the Generation's events into a response
object or its event stream; store.py keeps responses for retrieval and previous_response_id;
route.py is the HTTP edge.
"""
