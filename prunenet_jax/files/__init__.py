"""The ground floor of writing: atomic files and folders, output-folder checks, the run lock."""
