"""Media and text processing: decode, resize/tile, normalise; tokenise and render chat templates."""
