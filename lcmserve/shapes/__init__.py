"""The bundled "shapes" domain: captioned scenes, its teacher, domain CLIP and classifier."""
