"""Operations on a store: save, restore, gc, fsck, accounting, export/import."""
