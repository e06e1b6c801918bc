"""End-to-end examples (the README's main job lives in :mod:`fastlora.examples.sentiment`)."""
