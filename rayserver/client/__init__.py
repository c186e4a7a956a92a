"""rayfront, the client a designer runs inside a project directory."""
