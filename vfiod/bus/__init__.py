"""The D-Bus adaptor: validation, authorization, error mapping over the core manager."""
