"""One tool-call parser per file; cluster/tool_calls.py picks one by name (`ToolCallParserName`)."""
