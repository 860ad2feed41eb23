"""Lightning data modules: the procedural shapes set and image folders, with resumable sampling."""
