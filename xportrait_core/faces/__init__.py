"""Faces: landmarks, the reference crop, the driving frames' motion hints, eye/mouth regions, paste-back and
identity measures."""
